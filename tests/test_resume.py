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


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  """2N steps in one Run: (workdir, final host state, consumed batches)."""
  workdir = tmp_path_factory.mktemp("straight")
  run = Run(tiny_config(), workdir)
  consumed = recording(run)
  state = run.train(run.restore_or_init(), log=lambda *_: None)
  assert int(state["step"]) == 2 * N
  assert run.ckpt.manager.all_steps() == [2 * N]
  out = host(state)
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
