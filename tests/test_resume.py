"""Stopping and resuming is invisible: same parameters, same data order.

Training 2N steps straight and training N steps, dropping every object (a new
`Run` in the same workdir, as a new process would), then resuming to 2N must
give bit-identical parameters and optimizer state, and the resumed run must
consume exactly the batches the straight run consumed at steps N+1..2N.
Runs on a 2x2x2 (data, fsdp, tensor) mesh of the 8 fake CPU devices of
tests/conftest.py, so the restore goes into sharded arrays.
"""

import gc
import json
import os

import jax
import numpy as np
import pytest

from helpers import quick_compiles
from unimm.config import defaults
from unimm.errors import UserError
from unimm.train.loop import Run

N = 3


def tiny_config():
  c = defaults()
  c.model.update(width=32, depth=2, heads=2, mlp_dim=64, patch_size=8)
  # image_size 16 is Shapes' minimum; with one object per image, t2i / qa / edit
  # documents need at most 56 positions, so they all fit seq_len 64.
  c.data.update(image_size=16, seq_len=64, batch_size=8, two_object_prob=0.0)
  c.data.tasks = dict(t2i=1.0, qa=1.0, edit=1.0)
  c.optim.warmup_steps = 1
  # Both runs share train.steps = 2N: the cosine schedule depends on it.
  c.train.update(steps=2 * N, ckpt_every=10_000, log_every=10_000, keep_ckpts=5)
  c.mesh.update(data=2, fsdp=2, tensor=2, expert=1)
  return c


def recording(run):
  """Makes `run` append every batch it trains on (as host numpy) to a list."""
  consumed = []
  next_batch = run.next_batch

  def wrapped():
    batch = next_batch()
    consumed.append({k: np.asarray(jax.device_get(v)) for k, v in batch.items()})
    return batch

  run.next_batch = wrapped
  return consumed


def host(state):
  return jax.tree.map(np.asarray, jax.device_get(state))


def assert_same_batches(got, want):
  assert len(got) == len(want)
  for i, (g, w) in enumerate(zip(got, want)):
    assert g.keys() == w.keys()
    for k in w:
      np.testing.assert_array_equal(g[k], w[k], err_msg=f"batch {i} key {k!r}")


def assert_same_state(got, want):
  flat_g, tree_g = jax.tree_util.tree_flatten_with_path(got)
  flat_w, tree_w = jax.tree_util.tree_flatten_with_path(want)
  assert tree_g == tree_w
  for (path, g), (_, w) in zip(flat_g, flat_w):
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


next_losses = {}  # straight's workdir -> the loss of the step after its last checkpoint


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """2N steps in one Run: (workdir, final host state, consumed batches)."""
  workdir = tmp_path_factory.mktemp("straight")
  run = Run(tiny_config(), workdir)
  next_batch = run.next_batch
  consumed = recording(run)
  state = run.train(run.restore_or_init(), log=lambda *_: None)
  assert int(state["step"]) == 2 * N
  assert run.ckpt.manager.all_steps() == [2 * N]
  out = host(state)
  _, metrics = run.trainer.step(state, next_batch(), run.rng)  # for the restores onto other meshes
  next_losses[workdir] = float(metrics["loss"])
  del run, state
  gc.collect()
  return workdir, out, consumed


def test_stop_and_resume_matches_straight_run(tmp_path, straight):
  _, want_state, want_batches = straight
  assert len(want_batches) == 2 * N
  # Distinct batches, so equal order below is not vacuous.
  assert not np.array_equal(want_batches[N - 1]["tokens"], want_batches[N]["tokens"])

  # First process: N steps, then the loop checkpoints (it reached `steps`).
  run = Run(tiny_config(), tmp_path)
  first = recording(run)
  state = run.train(run.restore_or_init(), steps=N)
  assert int(state["step"]) == N
  assert run.ckpt.manager.all_steps() == [N]
  del run, state
  gc.collect()

  # Second process: a fresh Run in the same workdir resumes from step N.
  run = Run(tiny_config(), tmp_path)
  second = recording(run)
  state = run.restore_or_init(require=True)
  assert int(state["step"]) == N
  state = run.train(state, steps=2 * N)
  assert int(state["step"]) == 2 * N
  got_state = host(state)

  assert_same_batches(first, want_batches[:N])
  assert_same_batches(second, want_batches[N:])
  assert_same_state(got_state["params"], want_state["params"])
  assert_same_state(got_state, want_state)  # optimizer state too

  # Both processes appended their last step's metrics.
  with open(os.path.join(tmp_path, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == [N, 2 * N]


def test_finished_run_does_no_more_steps(straight):
  workdir, want_state, _ = straight
  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(metrics) as f:
    before = f.read()

  run = Run(tiny_config(), workdir)
  consumed = recording(run)
  state = run.restore_or_init(require=True)
  assert int(state["step"]) == 2 * N
  assert_same_state(host(state), want_state)  # the checkpoint round-trips exactly
  state = run.train(state)  # train.steps = 2N already reached
  assert int(state["step"]) == 2 * N
  assert consumed == []
  assert run.ckpt.manager.all_steps() == [2 * N]
  with open(metrics) as f:
    assert f.read() == before


def test_require_checkpoint_in_empty_workdir(tmp_path):
  run = Run(tiny_config(), tmp_path / "empty")
  with pytest.raises(UserError) as e:
    run.restore_or_init(require=True)
  msg = str(e.value)
  assert "\n" not in msg
  assert "no checkpoint" in msg and str(tmp_path / "empty") in msg


def test_checkpoint_loads_under_the_levers_and_refuses_another_shape(straight):
  workdir, want_state, _ = straight
  c = tiny_config()
  c.model.update(scan=True, remat="full", ce_chunk=16)  # the same model: the same checkpoint
  assert_same_state(host(Run(c, workdir, with_data=False).restore_or_init(require=True)), want_state)
  c = tiny_config()
  c.model.width = 48
  with pytest.raises(UserError) as e:
    Run(c, workdir, with_data=False).restore_or_init(require=True)
  msg = str(e.value)
  assert "\n" not in msg and "params/" in msg and ") there and (" in msg and ") here" in msg, msg


# ------------------------------------------------ non-finite steps (issue 14, point 3)


def poisoning(run, bad_calls):
  """Makes the `bad_calls`-th (1-based) batches of `run` hold NaN patches (a non-finite loss)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  next_batch, calls = run.next_batch, [0]

  def wrapped():
    batch = next_batch()
    calls[0] += 1
    if calls[0] in bad_calls:
      batch = dict(batch, patches=jax.device_put(batch["patches"] * jnp.nan,
                                                 run.trainer.batch_shardings["patches"]))
    return batch

  run.next_batch = wrapped


def fresh_data(run):
  from unimm.data.pipeline import make_iterator  # pylint: disable=import-outside-toplevel
  run.data = make_iterator(run.cfg)


def test_nonfinite_step_is_skipped_and_counted_and_stops_after_max_bad_steps(tmp_path):
  run = Run(tiny_config(), tmp_path)
  next_batch = run.next_batch
  # A run whose third batch is poisoned: the step is skipped, counted, and training goes on.
  poisoning(run, {3})
  got = host(run.train(run.trainer.init(), log=lambda *_: None))
  with open(tmp_path / "metrics.jsonl") as f:
    lines = [json.loads(line) for line in f]
  assert [m["nonfinite_steps"] for m in lines] == [1] and np.isfinite(lines[-1]["loss"])

  # The same data with that step skipped (its batch and step number spent, no update).
  run.next_batch = next_batch
  fresh_data(run)
  state = run.trainer.init()
  for i in range(2 * N):
    batch = run.next_batch()
    if i == 2:
      state = dict(state, step=state["step"] + 1)
    else:
      state, _ = run.trainer.step(state, batch, run.rng)
  assert_same_state(got, host(state))
  init = jax.tree.leaves(host(run.trainer.init())["params"])
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(got["params"]), init))

  # train.max_bad_steps poisoned steps in a row stop the run with one line.
  run.cfg.train.update(max_bad_steps=2, ckpt_every=1)
  fresh_data(run)
  poisoning(run, {2, 3, 4, 5})
  with pytest.raises(UserError) as e:
    run.train(run.trainer.init(), steps=2 * N + 1)
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("step 3: loss or gradient norm not finite for 2 steps in a row"), msg
  assert "train.max_bad_steps=2" in msg and "shapes records " in msg, msg
  assert f"the last good checkpoint is {tmp_path / 'checkpoints'}/" in msg, msg


# --------------------------------------------- restore onto another mesh (issue 14, point 4)


def next_loss(cfg, workdir, devices=None):
  """The loss of the step after the latest checkpoint of `workdir`, restored onto cfg.mesh."""
  run = Run(cfg, workdir, devices=devices)
  state = run.restore_or_init(require=True)
  _, metrics = run.trainer.step(state, run.next_batch(), run.rng)
  return float(metrics["loss"])


def test_checkpoint_restores_onto_other_meshes(straight):
  workdir, _, _ = straight  # saved on data=2, fsdp=2, tensor=2
  want = next_losses[workdir]  # that run's next step, on its mesh
  one = tiny_config()
  one.mesh.update(data=1, fsdp=1, tensor=1)
  other = tiny_config()
  other.mesh.update(data=1, fsdp=4, tensor=2)
  for cfg, devices in ((one, jax.devices()[:1]), (other, None)):
    with quick_compiles():  # (numerics within 1e-5 of the optimised program's)
      got = next_loss(cfg, workdir, devices)
    assert abs(got - want) <= 1e-5 * abs(want), (dict(cfg.mesh), got, want)


# ------------------------------------------------------- saves cut short, a full disk


def test_partial_save_is_ignored_with_one_line(tmp_path, straight):
  import shutil  # pylint: disable=import-outside-toplevel
  from unimm.train.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  workdir, _, _ = straight
  directory = tmp_path / "checkpoints"
  shutil.copytree(workdir / "checkpoints", directory)
  # What a process killed in the middle of saving step 7 leaves: Orbax's temporary folder.
  shutil.copytree(directory / str(2 * N), directory / f"{2 * N + 1}.orbax-checkpoint-tmp-1234")
  lines = []
  assert Checkpointer(directory, log=lines.append).latest_step() == 2 * N
  assert len(lines) == 1 and "ignoring 1 partial save" in lines[0], lines
  assert f"latest complete checkpoint is {2 * N}" in lines[0], lines


def test_full_disk_during_save_is_one_line_and_keeps_the_checkpoint(tmp_path, straight, monkeypatch):
  import errno  # pylint: disable=import-outside-toplevel
  import shutil  # pylint: disable=import-outside-toplevel
  from unimm.train import checkpoint  # pylint: disable=import-outside-toplevel
  workdir, _, _ = straight
  shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
  run = Run(tiny_config(), tmp_path)
  state = run.restore_or_init(require=True)

  def full(*_, **__):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(checkpoint.DataStateHandler, "save", full)
  with pytest.raises(UserError) as e:
    run.ckpt.save(2 * N + 1, state, run.data, force=True)
    run.ckpt.wait()
  msg = str(e.value)
  assert "\n" not in msg and "no space left on device" in msg, msg
  assert f"the last complete checkpoint ({2 * N}) is kept" in msg, msg
  assert run.ckpt.latest_step() == 2 * N


def test_damaged_checkpoint_is_one_line(tmp_path, straight):
  import shutil  # pylint: disable=import-outside-toplevel
  workdir, _, _ = straight
  step_dir = tmp_path / "checkpoints" / str(2 * N)
  damages = {
      "a truncated array file": lambda: max((p for p in (step_dir / "state").rglob("d/*")),
                                            key=lambda p: p.stat().st_size).write_bytes(b"x"),
      "garbage array metadata": lambda: (step_dir / "state" / "_METADATA").write_text("{oops"),
      "a lost data state": lambda: (step_dir / "data" / "process_0-of-1.json").unlink(),
  }
  for name, damage in damages.items():
    shutil.rmtree(tmp_path / "checkpoints", ignore_errors=True)
    shutil.copytree(workdir / "checkpoints", tmp_path / "checkpoints")
    damage()
    with pytest.raises(UserError) as e:
      Run(tiny_config(), tmp_path).restore_or_init()
    msg = str(e.value)
    assert "\n" not in msg and str(2 * N) in msg, (name, msg)
