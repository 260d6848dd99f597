"""Quantizers: parity with vector-quantize-pytorch, straight-through, losses, EMA, stats, config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimm.errors import UserError
from unimm.models.quantizers import FSQ, LFQ, VectorQuantizer, codebook_stats


def _rand(shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _official_fsq_bound(z, levels, eps=1e-3):
  """google-research fsq notebook `bound`, transcribed to numpy (float64)."""
  levels = np.asarray(levels, np.float64)
  half_l = (levels - 1) * (1 - eps) / 2
  offset = np.where(levels % 2 == 1, 0.0, 0.5)
  shift = np.tan(offset / half_l)
  return np.tanh(z + shift) * half_l - offset


def _lucidrains_fsq_bound(z, levels, eps=1e-3):
  levels = np.asarray(levels, np.float64)
  half_l = (levels - 1) * (1 + eps) / 2
  offset = np.where(levels % 2 == 0, 0.5, 0.0)
  return np.tanh(z + np.arctanh(offset / half_l)) * half_l - offset


def _far_from_boundary(b, margin=1e-3):
  return np.abs(np.abs(b - np.floor(b)) - 0.5) > margin


# --- FSQ --------------------------------------------------------------------------------------


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 5, 5, 5, 5]])
def test_fsq_matches_official_formula(levels):
  z = _rand((4, 64, len(levels)), scale=2.0)
  fsq = FSQ(levels)
  out = fsq(jnp.asarray(z))
  b = _official_fsq_bound(z.astype(np.float64), levels)
  ok = _far_from_boundary(b, 1e-4)
  hw = np.asarray(levels) // 2
  ref = np.round(b) / hw
  np.testing.assert_allclose(np.asarray(out["z_q"])[ok], ref[ok], atol=1e-6)
  basis = np.concatenate(([1], np.cumprod(levels[:-1])))
  ref_idx = np.sum((ref * hw + hw) * basis, -1).round().astype(np.int32)
  rows = ok.all(-1)
  np.testing.assert_array_equal(np.asarray(out["indices"])[rows], ref_idx[rows])
  np.testing.assert_allclose(np.asarray(fsq.indices_to_codes(out["indices"])), np.asarray(out["z_q"]),
                             atol=1e-6)
  all_idx = jnp.arange(fsq.num_codes)
  np.testing.assert_array_equal(np.asarray(fsq.codes_to_indices(fsq.indices_to_codes(all_idx))),
                                np.arange(fsq.num_codes))
  assert float(out["loss"]) == 0.0


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [7, 5, 5, 5, 5]])
def test_fsq_parity_vector_quantize_pytorch(levels):
  vqp = pytest.importorskip("vector_quantize_pytorch")
  torch = pytest.importorskip("torch")
  z = _rand((4, 256, len(levels)), seed=1, scale=2.0)
  ref = vqp.FSQ(levels).eval()
  with torch.no_grad():
    codes_t, idx_t = ref(torch.from_numpy(z))
  out = FSQ(levels)(jnp.asarray(z))
  codes, idx = np.asarray(out["z_q"]), np.asarray(out["indices"])
  # lucidrains bounds with (1+eps) and atanh, the official code with (1-eps) and tan: the
  # pre-round values differ by < 0.005, so codes agree except right at rounding boundaries.
  ok = (_far_from_boundary(_official_fsq_bound(z.astype(np.float64), levels), 1e-2)
        & _far_from_boundary(_lucidrains_fsq_bound(z.astype(np.float64), levels), 1e-2))
  assert ok.mean() > 0.9
  assert np.abs(codes - codes_t.numpy())[ok].max() <= 1e-5
  rows = ok.all(-1)
  np.testing.assert_array_equal(idx[rows], idx_t.numpy()[rows])
  np.testing.assert_allclose(np.asarray(FSQ(levels).indices_to_codes(jnp.asarray(idx_t.numpy()))),
                             codes_t.numpy(), atol=1e-6)


# --- LFQ --------------------------------------------------------------------------------------


def _np_lfq_entropy(z, temperature):
  """Per-bit factorised: E[sum_k H(p_k)] and sum_k H(E[p_k]), p_k(+1) = softmax over bits."""
  codes = np.array([-1.0, 1.0])
  logits = -(z[..., None] - codes) ** 2 / temperature  # [n, D, 2]
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  h = lambda q: -(q * np.log(np.maximum(q, 1e-300))).sum(-1)
  return h(p).sum(-1).mean(), h(p.mean(0)).sum(-1)


def test_lfq_against_numpy_reference():
  z = _rand((64, 6), seed=2, scale=0.3)
  lfq = LFQ(6, entropy_weight=0.1, commitment_weight=0.25, diversity_gamma=1.5, temperature=0.5)
  out = lfq(jnp.asarray(z))
  q = np.where(z > 0, 1.0, -1.0)
  np.testing.assert_array_equal(np.asarray(out["z_q"]), q)
  np.testing.assert_array_equal(np.asarray(out["indices"]), ((z > 0) * 2 ** np.arange(6)).sum(-1))
  np.testing.assert_array_equal(np.asarray(lfq.indices_to_codes(out["indices"])), q)
  per, batch = _np_lfq_entropy(z.astype(np.float64), 0.5)
  got_per, got_batch = lfq.entropy_terms(jnp.asarray(z))
  np.testing.assert_allclose([float(got_per), float(got_batch)], [per, batch], rtol=1e-5)
  ref_loss = 0.1 * (per - 1.5 * batch) + 0.25 * np.mean((z - q) ** 2)
  np.testing.assert_allclose(float(out["loss"]), ref_loss, rtol=1e-5, atol=1e-6)


def test_lfq_parity_vector_quantize_pytorch():
  vqp = pytest.importorskip("vector_quantize_pytorch")
  torch = pytest.importorskip("torch")
  d = 4
  z = _rand((2, 128, d), seed=3, scale=0.4)
  ref = vqp.LFQ(dim=d, entropy_loss_weight=1.0, commitment_loss_weight=0.0).train()
  with torch.no_grad():
    (q_t, idx_t, _), breakdown = ref(torch.from_numpy(z), inv_temperature=1.0,
                                     return_loss_breakdown=True)
  lfq = LFQ(d, temperature=1.0)
  out = lfq(jnp.asarray(z))
  assert np.abs(np.asarray(out["z_q"]) - q_t.numpy()).max() == 0.0
  # lucidrains packs bits most-significant first: its index is ours on reversed channels.
  np.testing.assert_array_equal(np.asarray(lfq(jnp.asarray(z[..., ::-1]))["indices"]), idx_t.numpy())
  per, batch = lfq.entropy_terms(jnp.asarray(z))
  # Same per-sample entropy: a softmax over all 2^d codes of -||z-c||^2/tau is the product of
  # the per-bit softmaxes (lucidrains' log clamp at 1e-5 is inactive at these magnitudes).
  assert abs(float(per) - breakdown.per_sample_entropy.item()) <= 1e-5
  # Batch term differs by definition: lucidrains takes the joint entropy of the mean over all
  # 2^d codes, ours (factorised) the sum of the per-bit marginal entropies, which bounds it above.
  assert float(batch) >= breakdown.batch_entropy.item() - 1e-5


# --- VQ ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("cosine", [False, True])
def test_vq_parity_vector_quantize_pytorch(cosine):
  vqp = pytest.importorskip("vector_quantize_pytorch")
  torch = pytest.importorskip("torch")
  k, d = 32, 8
  z = _rand((2, 50, d), seed=4)
  vq = VectorQuantizer(k, d, l2_normalize=cosine, rngs=nnx.Rngs(0))
  ref = vqp.VectorQuantize(dim=d, codebook_size=k, use_cosine_sim=cosine).eval()
  with torch.no_grad():
    ref._codebook.embed.copy_(torch.from_numpy(np.array(vq.codebook[...]))[None])
    q_t, idx_t, _ = ref(torch.from_numpy(z))
  out = vq(jnp.asarray(z))
  np.testing.assert_array_equal(np.asarray(out["indices"]), idx_t.numpy())
  assert np.abs(np.asarray(out["z_q"]) - q_t.numpy()).max() <= 1e-5


def test_vq_loss_hand_example():
  vq = VectorQuantizer(2, 2, beta=0.25, rngs=nnx.Rngs(0))
  vq.codebook[...] = jnp.array([[0.0, 0.0], [2.0, 2.0]])
  z = jnp.array([[0.5, 0.0], [2.0, 1.0]])
  out = vq(z)
  np.testing.assert_array_equal(np.asarray(out["indices"]), [0, 1])
  mse = (0.25 + 0.0 + 0.0 + 1.0) / 4  # both terms have the same value, different gradients
  np.testing.assert_allclose(float(out["loss"]), mse + 0.25 * mse, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(out["z_q"]), [[0.0, 0.0], [2.0, 2.0]])
  # Codebook term pulls codes, commitment term pushes z with weight beta.
  g = jax.grad(lambda z: vq(z)["loss"])(z)
  np.testing.assert_allclose(np.asarray(g), 0.25 * 2 * (np.asarray(z) - [[0, 0], [2, 2]]) / 4,
                             rtol=1e-6)
  ema = VectorQuantizer(2, 2, beta=0.25, ema=True, rngs=nnx.Rngs(0))
  ema.codebook[...] = jnp.array([[0.0, 0.0], [2.0, 2.0]])
  np.testing.assert_allclose(float(ema(z)["loss"]), 0.25 * mse, rtol=1e-6)


def test_vq_ema_update_matches_formula():
  k, d, decay, eps = 4, 2, 0.9, 1e-5
  vq = VectorQuantizer(k, d, ema=True, decay=decay, eps=eps, rngs=nnx.Rngs(0))
  e0 = np.array([[0, 0], [5, 5], [-5, 5], [5, -5]], np.float32)
  vq.codebook[...] = jnp.asarray(e0)
  vq.embed_sum[...] = jnp.asarray(e0)
  vq.cluster_size[...] = jnp.ones((k,), jnp.float32)
  z = np.array([[1, 0], [0, 1], [1, 1], [4, 6]], np.float32)
  out = vq(jnp.asarray(z), train=True)  # calls ema_update
  idx = np.asarray(out["indices"])
  np.testing.assert_array_equal(idx, [0, 0, 0, 1])
  onehot = np.eye(k)[idx]
  size = decay * np.ones(k) + (1 - decay) * onehot.sum(0)
  m = decay * e0 + (1 - decay) * onehot.T @ z
  smoothed = (size + eps) / (size.sum() + k * eps) * size.sum()
  np.testing.assert_allclose(np.asarray(vq.cluster_size[...]), size, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(vq.codebook[...]), m / smoothed[:, None], rtol=1e-5, atol=1e-6)
  mean0 = z[:3].mean(0)
  assert np.linalg.norm(np.asarray(vq.codebook[...])[0] - mean0) < np.linalg.norm(e0[0] - mean0)
  assert isinstance(vq.codebook, nnx.Variable) and not isinstance(vq.codebook, nnx.Param)
  assert not jax.tree.leaves(nnx.state(vq, nnx.Param))


def test_vq_restart_dead_codes():
  vq = VectorQuantizer(4, 3, ema=True, rngs=nnx.Rngs(0))
  before = np.asarray(vq.codebook[...]).copy()
  vq.cluster_size[...] = jnp.array([5.0, 0.0, 2.0, 0.01])
  z = _rand((2, 5, 3), seed=5) + 100.0  # far from every initial code
  dead = np.asarray(vq.restart_dead_codes(jnp.asarray(z), jax.random.key(0), threshold=0.5))
  np.testing.assert_array_equal(dead, [False, True, False, True])
  after = np.asarray(vq.codebook[...])
  np.testing.assert_array_equal(after[[0, 2]], before[[0, 2]])
  rows = z.reshape(-1, 3)
  for j in (1, 3):
    assert np.abs(rows - after[j]).sum(-1).min() == 0.0
  np.testing.assert_allclose(np.asarray(vq.cluster_size[...]), [5.0, 0.5, 2.0, 0.5])
  np.testing.assert_allclose(np.asarray(vq.embed_sum[...])[[1, 3]], after[[1, 3]] * 0.5)


def test_vq_codes_start_dead_so_the_first_restart_seeds_the_codebook_from_data():
  vq = VectorQuantizer(8, 3, ema=True, l2_normalize=True, rngs=nnx.Rngs(0))
  assert np.all(np.asarray(vq.cluster_size[...]) == 0) and np.all(np.asarray(vq.embed_sum[...]) == 0)
  z = jnp.asarray(_rand((4, 6, 3), seed=3))
  out = vq(z, train=True)  # EMA step: the unused codes keep their (random) values
  assert np.all(np.isfinite(np.asarray(vq.codebook[...])))
  dead = np.asarray(vq.restart_dead_codes(z, jax.random.key(0), threshold=0.5))
  assert dead.all()  # one step of EMA (decay 0.99) leaves every N below 0.5
  rows = np.asarray(z).reshape(-1, 3)
  rows = rows / np.linalg.norm(rows, axis=-1, keepdims=True)
  for code in np.asarray(vq.codebook[...]):
    assert np.abs(rows - code).sum(-1).min() < 1e-6
  del out


def test_vq_restart_prefers_poorly_covered_vectors():
  # 99 copies of one vector that code 0 already covers, one outlier: restarts go to the outlier.
  vq = VectorQuantizer(4, 2, ema=True, rngs=nnx.Rngs(0))
  vq.codebook[...] = jnp.array([[0.0, 0.0], [9.0, 9.0], [9.0, 9.0], [9.0, 9.0]])
  vq.cluster_size[...] = jnp.array([5.0, 0.0, 0.0, 0.0])
  z = np.zeros((100, 2), np.float32)
  z[37] = [3.0, -3.0]
  vq.restart_dead_codes(jnp.asarray(z), jax.random.key(1), threshold=0.5)
  np.testing.assert_array_equal(np.asarray(vq.codebook[...])[1:], [[3.0, -3.0]] * 3)


# --- straight-through -------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: VectorQuantizer(16, 4, rngs=nnx.Rngs(0)),
    lambda: VectorQuantizer(16, 4, ema=True, rngs=nnx.Rngs(0)),
    lambda: LFQ(4),
])
def test_straight_through_identity(make):
  m = make()
  z, w = jnp.asarray(_rand((3, 5, 4), seed=6)), jnp.asarray(_rand((3, 5, 4), seed=7))
  g = jax.grad(lambda z: jnp.sum(m(z)["z_q"] * w))(z)
  np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-6)


def test_straight_through_fsq_round_only():
  # FSQ's rounding is straight-through; the tanh bound before it keeps its own derivative.
  fsq = FSQ([8, 5, 5, 5])
  z, w = jnp.asarray(_rand((3, 5, 4), seed=6)), jnp.asarray(_rand((3, 5, 4), seed=7))
  g = jax.grad(lambda z: jnp.sum(fsq(z)["z_q"] * w))(z)
  hw = jnp.asarray([4.0, 2.0, 2.0, 2.0])
  g_ref = jax.grad(lambda z: jnp.sum(fsq.bound(z) / hw * w))(z)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-6)


def test_straight_through_vq_cosine_goes_through_normalisation():
  vq = VectorQuantizer(16, 4, l2_normalize=True, rngs=nnx.Rngs(0))
  z, w = jnp.asarray(_rand((3, 4), seed=6)), jnp.asarray(_rand((3, 4), seed=7))
  g = jax.grad(lambda z: jnp.sum(vq(z)["z_q"] * w))(z)
  g_ref = jax.grad(lambda z: jnp.sum(z / jnp.linalg.norm(z, axis=-1, keepdims=True) * w))(z)
  np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


# --- stats and config -------------------------------------------------------------------------


def test_codebook_stats():
  usage, ppl = codebook_stats(jnp.array([[0, 1], [2, 3]]), 8)
  np.testing.assert_allclose([float(usage), float(ppl)], [0.5, 4.0], rtol=1e-6)
  usage, ppl = codebook_stats(jnp.array([5, 5, 5]), 10)
  np.testing.assert_allclose([float(usage), float(ppl)], [0.1, 1.0], rtol=1e-6)
  usage, ppl = codebook_stats(jnp.array([0, 0, 0, 1]), 2)
  h = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
  np.testing.assert_allclose([float(usage), float(ppl)], [1.0, np.exp(h)], rtol=1e-6)
  usage, ppl = jax.jit(codebook_stats, static_argnums=1)(jnp.array([3, 1, 3, 1, 7, 7]), 2 ** 20)
  np.testing.assert_allclose([float(usage), float(ppl)], [3 / 2 ** 20, 3.0], rtol=1e-6)


@pytest.mark.parametrize("build", [
    lambda: FSQ([8, 1, 5]),
    lambda: FSQ([]),
    lambda: VectorQuantizer(0, 4, rngs=nnx.Rngs(0)),
    lambda: LFQ(0),
])
def test_bad_config_is_one_line_user_error(build):
  with pytest.raises(UserError) as e:
    build()
  assert "\n" not in str(e.value) and str(e.value)
