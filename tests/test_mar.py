"""Harmon / MAR (model.image_loss="mar"): the reveal schedule and mask ratios by hand, the
loss on a hand-checked case, the sampler against the training forward pass, 8 devices against
one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimm.batch import NOISED_IMAGE
from unimm.data import document as D
from unimm.data.pipeline import encode_document
from unimm.objectives import losses
from unimm.sample import sampler_from_run
from unimm.sampling.sampler import mar_schedule

from helpers import assert_8_devices_equal_one, trained_on_one_batch
from helpers import quick_compiling_module as _quick_compiles  # noqa: F401 (autouse)
from test_image_slot import _image, config


def test_reveal_schedule_and_mask_ratio_by_hand():
  """16 tokens in 4 steps: floor(16 cos(pi/2 k/4)) = 14, 11, 6, 0 stay masked: 2, 3, 5, 6 are
  revealed; never more steps than tokens, at least one token a step. Mask ratios lie in
  [mask_min, 1], one per image."""
  assert mar_schedule(16, 4) == [2, 3, 5, 6]
  assert mar_schedule(3, 8) == [1, 1, 1]
  for n, k in ((16, 12), (64, 8), (5, 5)):
    steps = mar_schedule(n, k)
    assert sum(steps) == n and min(steps) >= 1 and len(steps) == min(n, k)
  r = np.asarray(losses.mar_mask_ratio(jax.random.key(0), (4096,), 0.7))
  assert r.min() >= 0.7 and r.max() <= 1.0 and 0.8 < r.mean() < 0.9  # TN(1, .25) on [.7, 1]: 0.86
  seg = jnp.asarray([[1] * 6 + [2] * 6])
  batch = dict(tokens=jnp.zeros((1, 12), jnp.int32), segment_ids=seg,
               modality=jnp.asarray([[0, 2, 2, 2, 2, 0] * 2]),
               image_ids=jnp.asarray([[0, 1, 1, 1, 1, 0] * 2]))
  masked = np.asarray(losses.mar_masked(jax.random.key(1), batch, 1.0))  # r = 1: every token
  np.testing.assert_array_equal(masked[0], np.asarray(batch["modality"][0]) == 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, _quick_compiles):
  cfg = config({}, kind="pixels", loss="mar")
  cfg.model.mar.update(head_width=32, head_depth=1, t_repeat=2)
  cfg.sample.update(steps=3, mask_steps=4, cfg_scale=2.0)
  return trained_on_one_batch(cfg, tmp_path_factory.mktemp("mar"))


def test_mar_trains_and_its_sampler_matches_the_training_forward(trained, monkeypatch):
  """Four steps on one batch lower its loss; the state checkpoints. Sampling: every step's transformer output at the
  target tokens equals the loss's `mar_hidden` over the t2i document as the pipeline encodes
  it, holding the tokens known so far and the mask elsewhere; each step reveals the schedule's
  count of new tokens and keeps the known ones; every token is revealed once."""
  run, state, before, after, _ = trained
  assert np.isfinite(after) and after < before
  run.ckpt.save(4, state, run.data, force=True)  # (the mask vector and the MLP checkpoint too)
  run.ckpt.wait()
  assert int(run.restore_or_init()["step"]) == 4
  s = sampler_from_run(run, state)
  seen, z_fn = [], s._mar_z
  def record(params, b, x, idx, masked):
    z = z_fn(params, b, x, idx, masked)
    seen.append((np.asarray(x), np.asarray(masked), np.asarray(z)))
    return z
  monkeypatch.setattr(s, "_mar_z", record)
  image = s.text_to_image(["a red circle"], seed=2)
  assert image.shape == (1, 16, 16, 3)
  cond = seen[0::2]  # (cond, uncond) each step: guidance 2
  assert len(cond) == 4
  e = encode_document(D.document("t2i", [D.text("a red circle"), D.image(_image(), "target")]),
                      run.tokenizer, run.patcher)
  b = {k: jnp.asarray(v)[None] for k, v in e.items()}
  b["segment_ids"] = jnp.ones_like(b["tokens"])
  b["positions"] = jnp.arange(b["tokens"].shape[1])[None]
  at = np.nonzero(e["modality"] == D.NOISED_IMAGE)[0]
  model = s._model(s.params)
  revealed = []
  for k, (x, m, z) in enumerate(cond):
    patches = b["patches"].at[0, at].set(x[0])
    mask = jnp.zeros(b["tokens"].shape, bool).at[0, at].set(m[0])
    want = losses.mar_hidden(model, b, patches, mask)[0, at]
    np.testing.assert_allclose(z[0], np.asarray(want), rtol=1e-4, atol=1e-4)
    if k:
      prev_x, prev_m, _ = cond[k - 1]
      new = prev_m[0] & ~m[0]
      assert new.sum() == mar_schedule(len(at), 4)[k - 1] and not (m[0] & ~prev_m[0]).any()
      np.testing.assert_array_equal(x[0][~prev_m[0]], prev_x[0][~prev_m[0]])  # known stay
      revealed.append(new.sum())
  assert cond[0][1].all() and sum(revealed) + mar_schedule(len(at), 4)[-1] == len(at)


def test_mar_transformer_reads_no_time(trained):
  """MAR's transformer has no timestep input (its diffusion MLP embeds t): image tokens embed
  the same at any t, and differently for different patches."""
  run, state, _, _, batch = trained
  model = nnx.merge(run.trainer.graphdef, state["params"])
  b = {k: jnp.asarray(v) for k, v in batch.items()}
  embed = lambda t, p: model.embed_inputs(b["tokens"], p, jnp.full(b["tokens"].shape, t),
                                          b["modality"], b["patch_index"], b["segment_ids"],
                                          b["image_ids"])
  image = np.asarray(b["modality"]) != 0
  np.testing.assert_array_equal(np.asarray(embed(0.0, b["patches"])), np.asarray(embed(0.7, b["patches"])))
  moved = np.abs(np.asarray(embed(0.0, b["patches"] + 0.5) - embed(0.0, b["patches"]))).max(-1)
  assert (moved[image] > 0).all() and (moved[~image] == 0).all()


def test_mar_on_8_devices_equals_one_and_the_row_cap_is_exact(trained):
  """The MLP on at most mar.max_tokens positions a row: a cap at each row's count of target
  tokens gives the uncapped loss and gradients (the same draws, gathered); a smaller cap trains
  on a subset (another loss, finite). Loss and gradients of the capped MAR loss on data=2,
  fsdp=2, tensor=2 equal one device's."""
  from unimm.parallel.sharding import make_mesh
  from unimm.train.step import Trainer
  run, state, _, _, batch = trained
  cap = int((np.asarray(batch["modality"]) == NOISED_IMAGE).sum(1).max())
  assert 0 < cap < batch["modality"].shape[1]
  def loss_grads(max_tokens):
    cfg = run.cfg.copy_and_resolve_references()
    cfg.model.mar.max_tokens = max_tokens
    tr = (Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), run.trainer.vocab_size)
          if max_tokens else run.trainer)  # (the fixture's trainer has no cap)
    loss, grads = tr.loss_and_grads(state["params"], tr.device_batch(batch), jax.random.key(5))
    return float(loss), jax.device_get(grads)
  full, capped, sub = loss_grads(0), loss_grads(cap), loss_grads(max(cap // 4, 1))
  assert abs(capped[0] - full[0]) <= 1e-6 * abs(full[0]) and np.isfinite(sub[0]) and sub[0] != full[0]
  for a, b in zip(jax.tree.leaves(full[1]), jax.tree.leaves(capped[1])):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(a))) + 1e-30)
  assert_8_devices_equal_one(run, state, batch, mar=dict(max_tokens=max(cap // 2, 1)))
