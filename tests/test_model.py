"""The unified transformer: attention mask rules, KV cache, flow utilities."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimm.batch import CLEAN_IMAGE, NOISED_IMAGE, TEXT
from unimm.models.layers import MaskIds, attention_mask
from unimm.models.unified import build_model
from unimm.objectives import flow
from tests.helpers import tiny_config

T, C, N = TEXT, CLEAN_IMAGE, NOISED_IMAGE

# One packed row: sample 1 = text x3, noised image (2 patches), text x2;
#                 sample 2 = text x2, clean image (2 patches), text x1; then padding x2.
SEG = [1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 0, 0]
MOD = [T, T, T, N, N, T, T, T, T, C, C, T, T, T]
IMG = [0, 0, 0, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]
POS = [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 1]


def row_ids():
  a = lambda x: jnp.asarray([x], jnp.int32)
  return MaskIds(a(SEG), a(MOD), a(IMG), a(POS))


def test_mask_rules():
  m = np.asarray(attention_mask(row_ids(), row_ids()))[0]
  # causal over text
  assert m[2, 1] and m[2, 2] and not m[1, 2]
  # bidirectional inside each image, causal to the prefix
  assert m[3, 4] and m[4, 3] and m[3, 2] and m[9, 10] and m[10, 9] and m[9, 8]
  # noised image tokens are invisible to later tokens; clean ones are visible
  assert not m[5, 3] and not m[6, 4] and m[11, 9] and m[11, 10]
  # no attention across packed samples
  assert not m[7, 6] and not m[7, 0] and not m[12, 11]
  # text never sees later tokens
  assert not m[5, 6]


def _model(cfg, seed=0):
  model, patcher = build_model(cfg, vocab_size=64, seed=seed)
  # the flow head starts at zero; give it weights so that its output can move
  model.flow_head.value = 0.1 * jax.random.normal(jax.random.key(seed), model.flow_head.value.shape)
  return model, patcher


def _inputs(patcher, rng):
  L = len(SEG)
  tokens = jnp.asarray([rng.integers(3, 60, L)], jnp.int32)
  patches = jnp.asarray(rng.normal(size=(1, L, patcher.patch_dim)), jnp.float32)
  t = jnp.asarray([[0.7 if m == N else 0.0 for m in MOD]], jnp.float32)
  a = lambda x: jnp.asarray([x], jnp.int32)
  pidx = a([0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0])
  return dict(tokens=tokens, patches=patches, t=t, modality=a(MOD), image_ids=a(IMG),
              patch_index=pidx, segment_ids=a(SEG), positions=a(POS))


@pytest.mark.parametrize("rope_2d", [False, True])
def test_no_leak_from_noised_images_or_other_samples(rope_2d):
  cfg = tiny_config(**{"model.image_rope_2d": rope_2d})
  model, patcher = _model(cfg)
  rng = np.random.default_rng(0)
  x = _inputs(patcher, rng)
  logits, out, _ = model(**x)
  # change the noised patches of sample 1: later text (5, 6) and sample 2 must not move
  y = dict(x, patches=x["patches"].at[0, 3:5].add(1.0))
  logits2, out2, _ = model(**y)
  np.testing.assert_array_equal(logits[0, 5:12], logits2[0, 5:12])
  assert not np.allclose(out[0, 3:5], out2[0, 3:5])  # the image itself does change
  # change sample 2's clean image: its later text must move, sample 1 must not
  z = dict(x, patches=x["patches"].at[0, 9:11].add(1.0))
  logits3, _, _ = model(**z)
  np.testing.assert_array_equal(logits[0, :7], logits3[0, :7])
  assert not np.allclose(logits[0, 11], logits3[0, 11])


@pytest.mark.parametrize("rope_2d,levers", [(False, {}), (True, {"model.scan": True, "model.remat": "full"})])
def test_kv_cache_decoding_matches_full_forward(rope_2d, levers):
  """The teacher-forced forward (scanned blocks under remat in the second case) and decoding
  with the KV cache (which always runs the block loop) give the same logits."""
  cfg = tiny_config(**{"model.image_rope_2d": rope_2d, **levers})
  model, patcher = _model(cfg, seed=1)
  rng = np.random.default_rng(1)
  x = _inputs(patcher, rng)
  # only sample 1 (a left-aligned single sequence), no padding
  x = {k: v[:, :7] for k, v in x.items()}
  x["t"] = jnp.zeros_like(x["t"])
  x["modality"] = jnp.where(x["modality"] == N, C, x["modality"])  # a clean context image
  full, _, _ = model(**x)
  cache = model.init_cache(1, 16)
  prefix = {k: v[:, :5] for k, v in x.items()}
  logits, _, cache = model(**prefix, cache=cache, cache_index=0)
  np.testing.assert_allclose(logits, full[:, :5], rtol=1e-4, atol=1e-5)
  for i in (5, 6):
    step = {k: v[:, i:i + 1] for k, v in x.items()}
    logits, _, cache = model(**step, cache=cache, cache_index=i)
    np.testing.assert_allclose(logits[:, 0], full[:, i], rtol=1e-4, atol=1e-5)


def test_image_rope_2d_rotates_patches_by_row_and_col():
  from unimm.models.layers import rope, rope_sections
  assert rope_sections(16, 1) == (16,) and rope_sections(16, 3) == (8, 4, 4)
  cfg = tiny_config(**{"model.image_rope_2d": True})
  model, _ = _model(cfg)
  pos = jnp.asarray([[0, 1, 2, 3, 4, 5, 6]])
  mod = jnp.asarray([[T, T, C, C, C, C, T]])
  pidx = jnp.asarray([[0, 0, 0, 1, 2, 3, 0]])
  rp = np.asarray(model.rope_positions(pos, mod, pidx))[0]
  np.testing.assert_array_equal(rp[:, 0], np.arange(7))
  np.testing.assert_array_equal(rp[:, 1], [0, 0, 0, 0, 1, 1, 0])  # grid 2x2 (image 16, patch 8)
  np.testing.assert_array_equal(rp[:, 2], [0, 0, 0, 1, 0, 1, 0])
  # the first section rotates by the sequence position alone; rotations preserve norms
  x = jax.random.normal(jax.random.key(0), (1, 7, 2, 16))
  y = rope(x, jnp.asarray(rp)[None], 10_000.0)
  np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-5)
  np.testing.assert_allclose(y[..., :8], rope(x[..., :8], pos, 10_000.0), rtol=1e-6)


def test_per_image_time_is_shared_within_each_image():
  cfg = tiny_config()
  seg = jnp.asarray([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0]])
  img = jnp.asarray([[0, 1, 1, 2, 2, 0, 1, 1, 1, 0]])
  mod = jnp.asarray([[T, N, N, N, N, T, N, N, N, T]])
  t = np.asarray(flow.per_image_time(jax.random.key(0), seg, img, mod, cfg.flow, 32))[0]
  assert t[0] == t[5] == t[9] == 0.0
  assert t[1] == t[2] and t[3] == t[4] and t[6] == t[7] == t[8]
  assert len({t[1], t[3], t[6]}) == 3 and all(0 < v < 1 for v in (t[1], t[3], t[6]))


def test_flow_convention():
  x0 = jnp.ones((2, 3)) * 0.5
  eps = -jnp.ones((2, 3))
  np.testing.assert_allclose(flow.add_noise(x0, eps, jnp.ones(2)), eps)
  np.testing.assert_allclose(flow.add_noise(x0, eps, jnp.zeros(2)), x0)
  t = jnp.asarray([0.3, 0.8])
  x_t = flow.add_noise(x0, eps, t)
  # a perfect x0 prediction converts to the true velocity eps - x0
  np.testing.assert_allclose(flow.velocity(x0, x_t, t, "x0", 0.05), eps - x0, rtol=1e-6)
  # Euler integration of the true velocity from t=1 recovers x0 exactly (straight paths)
  ts = flow.euler_schedule(4, 3.0)
  assert ts[0] == 1.0 and ts[-1] == 0.0 and bool(jnp.all(jnp.diff(ts) < 0))
  x = eps
  for a, b in zip(ts[:-1], ts[1:]):
    x = x + (b - a) * (eps - x0)
  np.testing.assert_allclose(x, x0, atol=1e-6)


def test_shift_moves_time_toward_noise_for_larger_images():
  cfg = tiny_config()
  cfg.flow.shift = 1.0
  assert flow.resolution_shift(cfg.flow, 32) == 1.0
  assert flow.resolution_shift(cfg.flow, 64) == 2.0
  t = jnp.asarray(0.5)
  assert float(flow.shift_time(t, 2.0)) > 0.5


def test_unshifted_share_of_time_draws():
  """flow.unshifted_prob: that share of the draws keeps the unshifted logit-normal t, the
  rest the shifted one, each draw exactly one of the two (same normal underneath)."""
  cfg = tiny_config()
  cfg.flow.shift = 8.0
  rng = jax.random.PRNGKey(0)
  shifted = flow.sample_time(rng, (4000,), cfg.flow, 32)
  cfg.flow.shift = 1.0
  plain = flow.sample_time(rng, (4000,), cfg.flow, 32)
  cfg.flow.update(shift=8.0, unshifted_prob=0.25)
  mixed = flow.sample_time(rng, (4000,), cfg.flow, 32)
  is_plain = np.isclose(mixed, plain, atol=1e-6)
  assert np.all(is_plain | np.isclose(mixed, shifted, atol=1e-6))
  assert abs(is_plain.mean() - 0.25) < 0.03


def test_max_weight_caps_the_weight_of_an_x0_error():
  """flow.max_weight: an x0 prediction off by d at t costs d^2 / t^2 in the velocity loss, at
  most max_weight d^2; velocity predictions and max_weight 0 are left as they are."""
  from unimm.objectives.losses import flow_loss
  cfg = tiny_config(**{"model.prediction": "x0", "flow.max_weight": 4.0})
  t = jnp.asarray([[0.05, 0.25, 0.5, 0.9]])
  x0, eps, d = jnp.zeros((1, 4, 3)), jnp.ones((1, 4, 3)), 0.1
  x_t = flow.add_noise(x0, eps, t)
  v = flow.velocity(x0 + d, x_t, t, "x0", cfg.flow.t_min)
  for i, want in enumerate([4.0, 4.0, 4.0, 1 / 0.81]):  # min(1 / t^2, 4) d^2
    one = jnp.arange(4)[None] == i
    loss, _ = flow_loss(v, eps - x0, one.astype(jnp.float32), t, cfg)
    np.testing.assert_allclose(float(loss), want * d * d, rtol=1e-5)
  cfg.flow.max_weight = 0.0
  loss, _ = flow_loss(v, eps - x0, (jnp.arange(4)[None] == 0).astype(jnp.float32), t, cfg)
  np.testing.assert_allclose(float(loss), 400 * d * d, rtol=1e-5)
  assert flow.loss_scale(t, cfg.flow, "velocity") == 1.0


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_step_keeps_float32_master_weights(dtype):
  from unimm.data.pipeline import make_iterator
  from unimm.parallel.sharding import make_mesh
  from unimm.train.step import Trainer
  cfg = tiny_config(**{"model.dtype": dtype})
  trainer = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), 384)
  state = trainer.init()
  batch = trainer.device_batch(next(make_iterator(cfg)))
  state, metrics = trainer.step(state, batch, jax.random.key(0))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
  assert np.isfinite(float(metrics["loss"])) and int(state["step"]) == 1
  assert float(metrics["text_tokens"]) > 0 and float(metrics["image_tokens"]) > 0
