"""Image-tokenizer quantizers as Flax NNX modules: VQ (optionally EMA), FSQ, LFQ.

Inputs are channels last, `z: [..., D]`. Each quantizer returns a dict:
  z_q         quantized values, straight-through gradient to `z`
  indices     int32 [...], the code of each vector
  loss        scalar auxiliary loss (0 for FSQ)
  usage       fraction of the codebook used in this batch
  perplexity  exp(entropy of this batch's code histogram)

Squared-distance losses are means over all elements (taming / Janus / lucidrains).
Quantization runs in float32; `z_q` comes back in the dtype of `z`.
"""


import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.errors import UserError
from unimm.models.layers import param


class QuantizerStat(nnx.Variable):
  """Running statistics updated outside the optimizer (EMA cluster sizes and sums, EMA codebook)."""


def codebook_stats(indices, num_codes):
  """(usage, perplexity) of the codes in `indices` among `num_codes` codes.

  usage = distinct codes / num_codes; perplexity = exp(H(histogram)). Sort-based,
  so it costs O(n log n) whatever the codebook size (LFQ has 2^dim codes).
  """
  flat = jnp.sort(indices.reshape(-1))
  n = flat.shape[0]
  starts = jnp.concatenate([jnp.ones((1,), bool), flat[1:] != flat[:-1]])
  run = jnp.cumsum(starts) - 1
  counts = jax.ops.segment_sum(jnp.ones((n,), jnp.float32), run, num_segments=n)
  p = counts / n
  entropy = -jnp.sum(jax.scipy.special.xlogy(p, p))
  usage = jnp.sum(starts).astype(jnp.float32) / float(num_codes)
  return usage, jnp.exp(entropy)


def _l2norm(x, eps=1e-12):
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def _check_dim(z, dim, name):
  if z.shape[-1] != dim:
    raise UserError(f"{name} expects inputs with last dimension {dim}, got shape {tuple(z.shape)}")


class VectorQuantizer(nnx.Module):
  """VQ-VAE / VQGAN quantizer: nearest code by squared (or, l2_normalize, cosine) distance.

  loss = ||sg[z] - e||^2 + beta ||z - sg[e]||^2; with `ema=True` only the commitment
  term, and the codebook follows e = m / N (Laplace-smoothed N) via `ema_update`.
  Cluster sizes N are tracked in both modes so `restart_dead_codes` works for both.
  N starts at 0 (and m at 0): every code counts as dead until used, so the first
  `restart_dead_codes` seeds the whole codebook from encoder outputs (data init)
  instead of waiting ~log(threshold)/log(decay) steps while all tokens share a few codes.
  """

  def __init__(self, num_codes, dim, *, beta=0.25, l2_normalize=False, ema=False, decay=0.99,
               eps=1e-5, rngs):
    if int(num_codes) < 1:
      raise UserError(f"VectorQuantizer num_codes must be >= 1, got {num_codes}")
    if int(dim) < 1:
      raise UserError(f"VectorQuantizer dim must be >= 1, got {dim}")
    if not 0.0 <= decay < 1.0:
      raise UserError(f"VectorQuantizer decay must be in [0, 1), got {decay}")
    self.num_codes, self.dim = int(num_codes), int(dim)
    self.beta, self.l2_normalize, self.ema = float(beta), bool(l2_normalize), bool(ema)
    self.decay, self.eps = float(decay), float(eps)
    init = param(rngs, (self.num_codes, self.dim), (None, None), 1.0)
    if self.l2_normalize:
      init = nnx.Param(_l2norm(init[...]), axes=(None, None))
    # With EMA the codebook is not trained by gradients: keep it out of the Params.
    self.codebook = QuantizerStat(init[...], axes=(None, None)) if self.ema else init
    self.cluster_size = QuantizerStat(jnp.zeros((self.num_codes,), jnp.float32), axes=(None,))
    self.embed_sum = QuantizerStat(jnp.zeros_like(init[...]), axes=(None, None))

  def codes(self):
    """The codebook as used for lookup ([num_codes, dim], normalised when l2_normalize)."""
    e = self.codebook[...].astype(jnp.float32)
    return _l2norm(e) if self.l2_normalize else e

  def _prepare(self, z):
    z = z.astype(jnp.float32)
    return _l2norm(z) if self.l2_normalize else z

  def nearest(self, z):
    """int32 indices of the nearest codes for `z` [..., dim] (after normalisation if any)."""
    e = self.codes()
    dots = jnp.einsum("...d,kd->...k", z, e, precision=jax.lax.Precision.HIGHEST)
    dist = jnp.sum(z * z, -1, keepdims=True) - 2.0 * dots + jnp.sum(e * e, -1)
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)

  def indices_to_codes(self, indices):
    return jnp.take(self.codes(), indices, axis=0)

  def __call__(self, z, *, train=False):
    _check_dim(z, self.dim, "VectorQuantizer")
    zf = self._prepare(z)
    indices = self.nearest(jax.lax.stop_gradient(zf))
    e = self.indices_to_codes(indices)
    commitment = jnp.mean((zf - jax.lax.stop_gradient(e)) ** 2)
    loss = self.beta * commitment
    if not self.ema:
      loss = loss + jnp.mean((jax.lax.stop_gradient(zf) - e) ** 2)
    z_q = zf + jax.lax.stop_gradient(e - zf)
    usage, perplexity = codebook_stats(indices, self.num_codes)
    if train:
      self.ema_update(z, indices)
    return {"z_q": z_q.astype(z.dtype), "indices": indices, "loss": loss, "usage": usage,
            "perplexity": perplexity}

  def ema_update(self, z, indices):
    """One EMA step: N <- dN + (1-d)n, m <- dm + (1-d)sum z, e = m / smoothed N.

    Without `ema` only the cluster sizes N move (for `restart_dead_codes`).
    """
    zf = jax.lax.stop_gradient(self._prepare(z)).reshape(-1, self.dim)
    onehot = jax.nn.one_hot(indices.reshape(-1), self.num_codes, dtype=jnp.float32)
    d = self.decay
    size = d * self.cluster_size[...] + (1.0 - d) * onehot.sum(0)
    self.cluster_size[...] = size
    if not self.ema:
      return
    sums = jnp.einsum("nk,nd->kd", onehot, zf, precision=jax.lax.Precision.HIGHEST)
    m = d * self.embed_sum[...] + (1.0 - d) * sums
    self.embed_sum[...] = m
    total = size.sum()
    smoothed = (size + self.eps) / (total + self.num_codes * self.eps) * total
    # Codes never used yet (N = m = 0) keep their current value.
    e = jnp.where(size[:, None] > 0, m / smoothed[:, None], self.codebook[...].astype(jnp.float32))
    self.codebook[...] = (_l2norm(e) if self.l2_normalize else e).astype(self.codebook[...].dtype)

  def restart_dead_codes(self, z, rng, threshold):
    """Replaces codes with cluster size N < threshold by encoder outputs of `z`.

    The outputs are drawn with probability proportional to their squared distance to
    the nearest code (k-means++ style, with a small uniform floor), so new codes go
    where the codebook covers the data worst rather than onto the dominant vector
    (the black background of Shapes, most of the tokens). Their N is reset to
    `threshold` and m to code * threshold. Returns the bool mask of replaced codes.
    """
    zf = jax.lax.stop_gradient(self._prepare(z)).reshape(-1, self.dim)
    n = zf.shape[0]
    err = jnp.sum((zf - self.indices_to_codes(self.nearest(zf))) ** 2, axis=-1)
    weights = err + 1e-3 * jnp.mean(err) + 1e-12
    picks = jax.random.choice(rng, n, (self.num_codes,), replace=True, p=weights / weights.sum())
    sampled = zf[picks]
    dead = self.cluster_size[...] < threshold
    self.codebook[...] = jnp.where(dead[:, None], sampled, self.codebook[...]).astype(
        self.codebook[...].dtype)
    self.cluster_size[...] = jnp.where(dead, jnp.float32(threshold), self.cluster_size[...])
    self.embed_sum[...] = jnp.where(dead[:, None], sampled * threshold, self.embed_sum[...])
    return dead


class FSQ(nnx.Module):
  """Finite scalar quantization (Mentzer et al. 2023), as the official google-research code.

  Per channel with L levels: half = (L-1)(1-eps)/2, offset = 0.5 if L even else 0,
  shift = tan(offset/half), z_q = round_ste(tanh(z + shift) * half - offset) / (L // 2).
  (vector-quantize-pytorch uses (1+eps) and atanh instead; codes differ only for inputs
  within ~0.005 of a rounding boundary.) Indices are mixed radix, first channel fastest.
  """

  def __init__(self, levels, *, eps=1e-3, rngs=None):
    del rngs
    levels = [int(l) for l in levels]
    if not levels or min(levels) < 2:
      raise UserError(f"FSQ levels must all be >= 2, got {levels}")
    size = int(np.prod(levels))
    if size >= 2 ** 31:
      raise UserError(f"FSQ codebook size prod(levels)={size} does not fit int32 indices")
    self.levels, self.eps, self.num_codes, self.dim = tuple(levels), float(eps), size, len(levels)
    self.basis = tuple(int(b) for b in np.concatenate(([1], np.cumprod(levels[:-1]))))

  def _consts(self):
    levels = np.asarray(self.levels, np.float64)
    half_l = (levels - 1) * (1 - self.eps) / 2
    offset = np.where(levels % 2 == 1, 0.0, 0.5)
    shift = np.tan(offset / half_l)
    half_width = np.asarray(self.levels) // 2
    return (jnp.asarray(half_l, jnp.float32), jnp.asarray(offset, jnp.float32),
            jnp.asarray(shift, jnp.float32), jnp.asarray(half_width, jnp.float32))

  def bound(self, z):
    """tanh(z + shift) * half - offset, before rounding."""
    half_l, offset, shift, _ = self._consts()
    return jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset

  def quantize(self, z):
    """Normalised codes in [-1, 1] with a straight-through round."""
    bounded = self.bound(z)
    rounded = bounded + jax.lax.stop_gradient(jnp.round(bounded) - bounded)
    return rounded / self._consts()[3]

  def codes_to_indices(self, codes):
    hw = self._consts()[3]
    digits = codes.astype(jnp.float32) * hw + hw
    return jnp.round(jnp.sum(digits * jnp.asarray(self.basis, jnp.float32), -1)).astype(jnp.int32)

  def indices_to_codes(self, indices):
    hw = self._consts()[3]
    idx = indices[..., None].astype(jnp.int32)
    digits = (idx // jnp.asarray(self.basis, jnp.int32)) % jnp.asarray(self.levels, jnp.int32)
    return (digits.astype(jnp.float32) - hw) / hw

  def __call__(self, z, *, train=False):
    del train
    _check_dim(z, self.dim, "FSQ")
    z_q = self.quantize(z)
    indices = self.codes_to_indices(jax.lax.stop_gradient(z_q))
    usage, perplexity = codebook_stats(indices, self.num_codes)
    return {"z_q": z_q.astype(z.dtype), "indices": indices, "loss": jnp.zeros((), jnp.float32),
            "usage": usage, "perplexity": perplexity}


def _bernoulli_entropy(p):
  return -(jax.scipy.special.xlogy(p, p) + jax.scipy.special.xlogy(1.0 - p, 1.0 - p))


class LFQ(nnx.Module):
  """Lookup-free quantization (MAGVIT-v2): q = sign(z) in {-1, +1}, index = sum_k 2^k [z_k > 0].

  loss = entropy_weight * (E[H(p(.|z))] - gamma * H(E[p(.|z)])) + commitment_weight * ||z - sg[q]||^2,
  p(.|z) the softmax over -||z - c||^2 / temperature, factorised per bit:
  p_k(+1|z) = sigmoid(4 z_k / temperature). temperature 0.01 = lucidrains' inv_temperature 100.
  """

  def __init__(self, dim, *, entropy_weight=0.1, commitment_weight=0.25, diversity_gamma=1.0,
               temperature=0.01, rngs=None):
    del rngs
    if not 1 <= int(dim) <= 30:
      raise UserError(f"LFQ dim must be in [1, 30] (2^dim codes, int32 indices), got {dim}")
    if temperature <= 0:
      raise UserError(f"LFQ temperature must be > 0, got {temperature}")
    self.dim, self.num_codes = int(dim), 2 ** int(dim)
    self.entropy_weight, self.commitment_weight = float(entropy_weight), float(commitment_weight)
    self.diversity_gamma, self.temperature = float(diversity_gamma), float(temperature)

  def indices_to_codes(self, indices):
    bits = (indices[..., None].astype(jnp.int32) >> jnp.arange(self.dim, dtype=jnp.int32)) & 1
    return bits.astype(jnp.float32) * 2.0 - 1.0

  def entropy_terms(self, z):
    """(mean per-sample entropy, entropy of the batch-mean distribution), in nats, per-bit factorised."""
    logits = 4.0 * z.astype(jnp.float32).reshape(-1, self.dim) / self.temperature
    p = jax.nn.sigmoid(logits)
    log_p, log_q = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
    per_sample = -jnp.sum(p * log_p + (1.0 - p) * log_q, axis=-1).mean()
    batch = jnp.sum(_bernoulli_entropy(p.mean(0)))
    return per_sample, batch

  def __call__(self, z, *, train=False):
    del train
    _check_dim(z, self.dim, "LFQ")
    zf = z.astype(jnp.float32)
    q = jnp.where(zf > 0, 1.0, -1.0)
    indices = jnp.sum((zf > 0).astype(jnp.int32) << jnp.arange(self.dim, dtype=jnp.int32), -1)
    per_sample, batch = self.entropy_terms(zf)
    entropy = per_sample - self.diversity_gamma * batch
    commitment = jnp.mean((zf - q) ** 2)
    loss = self.entropy_weight * entropy + self.commitment_weight * commitment
    z_q = zf + jax.lax.stop_gradient(q - zf)
    usage, perplexity = codebook_stats(indices, self.num_codes)
    return {"z_q": z_q.astype(z.dtype), "indices": indices.astype(jnp.int32), "loss": loss,
            "usage": usage, "perplexity": perplexity}
