"""Shared layers: RMSNorm, RoPE, SwiGLU, attention over id-built masks, timestep embedding.

Parameters carry logical axis names in their `axes` metadata (see
`unimm.parallel.sharding`); activations are constrained by logical names too.
Modules compute in the dtype of their parameters: the train step casts the
float32 master weights to the compute dtype before the forward pass.
"""

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.data.document import NOISED_IMAGE
from unimm.parallel.sharding import constrain


def param(rngs, shape, axes, std=None, zeros=False, ones=False):
  if zeros:
    value = jnp.zeros(shape, jnp.float32)
  elif ones:
    value = jnp.ones(shape, jnp.float32)
  else:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(value, axes=tuple(axes))


class RMSNorm(nnx.Module):

  def __init__(self, dim, *, rngs, eps=1e-6):
    self.scale = param(rngs, (dim,), ("norm",), ones=True)
    self.eps = eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * self.scale.value.astype(jnp.float32)).astype(x.dtype)


def rope_sections(head_dim, axes):
  """How many of a head's dims each position axis rotates: all for one axis;
  for (sequence, row, col) half for the sequence and a quarter for each image axis."""
  if axes == 1:
    return (head_dim,)
  quarter = (head_dim // 4) // 2 * 2
  return (head_dim - 2 * quarter, quarter, quarter)


def rope(x, positions, theta):
  """Rotary embedding, rotate-half pairing, per section of the head dims.

  x: [B, L, H, D]; positions: [B, L] (1-D) or [B, L, A] (one column per axis,
  each rotating its own section of D, see `rope_sections`).
  """
  if positions.ndim == 2:
    positions = positions[..., None]
  out = []
  start = 0
  for axis, size in enumerate(rope_sections(x.shape[-1], positions.shape[-1])):
    part = x[..., start:start + size].astype(jnp.float32)
    start += size
    freqs = theta ** (-jnp.arange(0, size, 2, dtype=jnp.float32) / size)
    angles = positions[..., axis, None].astype(jnp.float32) * freqs  # [B, L, size/2]
    sin, cos = jnp.sin(angles)[:, :, None, :], jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(part, 2, axis=-1)
    out += [x1 * cos - x2 * sin, x2 * cos + x1 * sin]
  return jnp.concatenate(out, axis=-1).astype(x.dtype)


class MaskIds(NamedTuple):
  """What the attention mask is made of, per token ([B, L] int32 each)."""
  segment: jax.Array   # packed sample, 1-based; 0 = padding / empty cache slot
  modality: jax.Array  # TEXT, CLEAN_IMAGE or NOISED_IMAGE
  image: jax.Array     # image instance within the sample, 1-based; 0 = text
  position: jax.Array  # position within the sample


def attention_mask(q: MaskIds, kv: MaskIds):
  """[B, Lq, Lk] bool: causal over text, bidirectional inside each image, no
  attention across packed samples, and noised image tokens visible only to
  tokens of their own image."""
  same_seg = q.segment[:, :, None] == kv.segment[:, None, :]
  same_img = same_seg & (q.image[:, :, None] == kv.image[:, None, :]) & (kv.image[:, None, :] > 0)
  causal = kv.position[:, None, :] <= q.position[:, :, None]
  noised_key = (kv.modality == NOISED_IMAGE)[:, None, :]
  return same_seg & (causal | same_img) & ~(noised_key & ~same_img)


def attention(q, k, v, q_ids: MaskIds, kv_ids: MaskIds, impl="xla"):
  """Masked attention. q: [B, Lq, H, D], k/v: [B, Lk, H, D] -> [B, Lq, H, D].

  The mask is given as ids, never as a dense array, so fused kernels that build
  it from segment / modality / image ids can replace the XLA path.
  """
  if impl != "xla":
    raise NotImplementedError(f"attention kernel '{impl}' is not available; use model.attention='xla'")
  mask = attention_mask(q_ids, kv_ids)
  scale = 1.0 / math.sqrt(q.shape[-1])
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None], scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class Attention(nnx.Module):
  """Multi-head self-attention with QK-norm and RoPE; optional KV cache."""

  def __init__(self, width, heads, depth, *, rngs, rope_theta, impl):
    self.heads, self.head_dim = heads, width // heads
    std = 1.0 / math.sqrt(width)
    self.wq = param(rngs, (width, heads, self.head_dim), ("embed", "heads", "kv"), std)
    self.wk = param(rngs, (width, heads, self.head_dim), ("embed", "heads", "kv"), std)
    self.wv = param(rngs, (width, heads, self.head_dim), ("embed", "heads", "kv"), std)
    self.wo = param(rngs, (heads, self.head_dim, width), ("heads", "kv", "embed"),
                    std / math.sqrt(2 * depth))
    self.q_norm = RMSNorm(self.head_dim, rngs=rngs)
    self.k_norm = RMSNorm(self.head_dim, rngs=rngs)
    self.rope_theta, self.impl = rope_theta, impl

  def __call__(self, x, ids: MaskIds, rope_pos, cache=None, cache_index=None):
    act = ("batch", "length", "act_heads", None)
    q = constrain(jnp.einsum("bld,dhk->blhk", x, self.wq.value), act)
    k = constrain(jnp.einsum("bld,dhk->blhk", x, self.wk.value), act)
    v = constrain(jnp.einsum("bld,dhk->blhk", x, self.wv.value), act)
    q = rope(self.q_norm(q), rope_pos, self.rope_theta)
    k = rope(self.k_norm(k), rope_pos, self.rope_theta)
    kv_ids = ids
    if cache is not None:  # write this chunk at cache_index, attend over the whole cache
      k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, 1)
      v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, 1)
      kv_ids = MaskIds(*(jax.lax.dynamic_update_slice_in_dim(c, n, cache_index, 1)
                         for c, n in zip(cache["ids"], ids)))
      cache = {"k": k, "v": v, "ids": kv_ids}
    out = attention(q, k, v, ids, kv_ids, self.impl)
    out = constrain(out, act)
    return jnp.einsum("blhk,hkd->bld", out, self.wo.value), cache


class SwiGLU(nnx.Module):

  def __init__(self, width, hidden, depth, *, rngs):
    std = 1.0 / math.sqrt(width)
    self.w_gate = param(rngs, (width, hidden), ("embed", "mlp"), std)
    self.w_up = param(rngs, (width, hidden), ("embed", "mlp"), std)
    self.w_down = param(rngs, (hidden, width), ("mlp", "embed"),
                        1.0 / math.sqrt(hidden) / math.sqrt(2 * depth))

  def __call__(self, x):
    h = jax.nn.silu(x @ self.w_gate.value) * (x @ self.w_up.value)
    h = constrain(h, ("batch", "length", "act_mlp"))
    return h @ self.w_down.value


def timestep_embedding(t, dim, max_period=10_000.0):
  """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as in diffusers / FLUX)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class Block(nnx.Module):
  """Pre-norm transformer block: attention then SwiGLU, each residual."""

  def __init__(self, cfg, *, rngs):
    self.attn_norm = RMSNorm(cfg.width, rngs=rngs)
    self.attn = Attention(cfg.width, cfg.heads, cfg.depth, rngs=rngs,
                          rope_theta=cfg.rope_theta, impl=cfg.attention)
    self.mlp_norm = RMSNorm(cfg.width, rngs=rngs)
    self.mlp = SwiGLU(cfg.width, cfg.mlp_dim, cfg.depth, rngs=rngs)

  def __call__(self, x, ids, rope_pos, cache=None, cache_index=None):
    h, cache = self.attn(self.attn_norm(x), ids, rope_pos, cache, cache_index)
    x = constrain(x + h, ("batch", "length", "act_embed"))
    x = constrain(x + self.mlp(self.mlp_norm(x)), ("batch", "length", "act_embed"))
    return x, cache
