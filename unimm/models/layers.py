"""Shared layers: RMSNorm, RoPE, SwiGLU, attention over id-built masks, timestep embedding.

Parameters carry logical axis names in their `axes` metadata (see
`unimm.parallel.sharding`); activations are constrained by logical names too.
Modules compute in the dtype of their parameters: the train step casts the
float32 master weights to the compute dtype before the forward pass.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from unimm.errors import UserError
from unimm.kernels import attention as kernels
from unimm.kernels.mask import MaskIds, aligned_source, attention_mask  # noqa: F401 (the mask's API, used by models)
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


def attention(q, k, v, q_ids: MaskIds, kv_ids: MaskIds, impl="auto"):
  """Masked attention over the unified mask (`unimm.kernels.mask`). q: [B, Lq, H, D],
  k/v: [B, Lk, KV, D] (grouped-query heads when KV < H) -> [B, Lq, H, D].

  The mask is given as ids, never as a dense array: `impl` (model.attention) picks the XLA
  path or a flash kernel that builds each mask tile from the ids (`unimm.kernels.attention`).
  """
  return kernels.attention(q, k, v, q_ids, kv_ids, impl)


def cached_attention(q, k, v, ids: MaskIds, cache=None, cache_index=None, impl="auto"):
  """Writes k/v (and their mask ids) at cache_index of `cache` when given, then attends
  over the whole cache. Returns (out [B, Lq, H, D], new cache or None)."""
  kv_ids = ids
  if cache is not None:
    k = jax.lax.dynamic_update_slice_in_dim(cache["k"], k.astype(cache["k"].dtype), cache_index, 1)
    v = jax.lax.dynamic_update_slice_in_dim(cache["v"], v.astype(cache["v"].dtype), cache_index, 1)
    kv_ids = MaskIds(*(jax.lax.dynamic_update_slice_in_dim(c, n, cache_index, 1)
                       for c, n in zip(cache["ids"], ids)))
    cache = {"k": k, "v": v, "ids": kv_ids}
  out = checkpoint_name(attention(q, k, v, ids, kv_ids, impl), "context")
  return constrain(out, ("batch", "length", "act_heads", None)), cache


class Attention(nnx.Module):
  """Multi-head self-attention with RoPE, grouped-query heads (kv_heads), optional
  QK-norm and q/k/v biases (Llama, Qwen2, Qwen3 layouts); optional KV cache.
  `qkv` and `out` are the projections, so that mixture-of-transformers blocks can
  pick them per token around one shared attention (`cached_attention`)."""

  def __init__(self, cfg, *, rngs):
    width, heads = cfg.width, cfg.heads
    kv_heads = cfg.kv_heads or heads
    head_dim = cfg.head_dim or width // heads
    if heads % kv_heads:
      raise UserError(f"model.heads={heads} is not a multiple of model.kv_heads={kv_heads}")
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
    std = 1.0 / math.sqrt(width)
    self.wq = param(rngs, (width, heads, head_dim), ("embed", "heads", "kv"), std)
    self.wk = param(rngs, (width, kv_heads, head_dim), ("embed", "heads", "kv"), std)
    self.wv = param(rngs, (width, kv_heads, head_dim), ("embed", "heads", "kv"), std)
    self.wo = param(rngs, (heads, head_dim, width), ("heads", "kv", "embed"),
                    1.0 / math.sqrt(heads * head_dim) / math.sqrt(2 * cfg.depth))
    bias = lambda n: param(rngs, (n, head_dim), ("heads", "kv"), zeros=True) if cfg.qkv_bias else None
    self.bq, self.bk, self.bv = bias(heads), bias(kv_heads), bias(kv_heads)
    norm = lambda: RMSNorm(head_dim, rngs=rngs, eps=cfg.norm_eps) if cfg.qk_norm else None
    self.q_norm, self.k_norm = norm(), norm()
    self.rope_theta, self.impl = cfg.rope_theta, cfg.attention

  def qkv(self, x, rope_pos):
    act = ("batch", "length", "act_heads", None)

    def proj(w, b, norm):
      y = checkpoint_name(jnp.einsum("bld,dhk->blhk", x, w.value), "qkv")
      y = y if b is None else y + b.value
      y = y if norm is None else norm(y)
      return constrain(y, act)

    q = rope(proj(self.wq, self.bq, self.q_norm), rope_pos, self.rope_theta)
    k = rope(proj(self.wk, self.bk, self.k_norm), rope_pos, self.rope_theta)
    return q, k, proj(self.wv, self.bv, None)

  def out(self, o):
    return checkpoint_name(jnp.einsum("blhk,hkd->bld", o, self.wo.value), "attn_out")

  def __call__(self, x, ids: MaskIds, rope_pos, cache=None, cache_index=None):
    q, k, v = self.qkv(x, rope_pos)
    o, cache = cached_attention(q, k, v, ids, cache, cache_index, self.impl)
    return self.out(o), cache


class SwiGLU(nnx.Module):

  def __init__(self, width, hidden, depth, *, rngs):
    std = 1.0 / math.sqrt(width)
    self.w_gate = param(rngs, (width, hidden), ("embed", "mlp"), std)
    self.w_up = param(rngs, (width, hidden), ("embed", "mlp"), std)
    self.w_down = param(rngs, (hidden, width), ("mlp", "embed"),
                        1.0 / math.sqrt(hidden) / math.sqrt(2 * depth))

  def __call__(self, x):
    gate = checkpoint_name(x @ self.w_gate.value, "mlp_in")
    up = checkpoint_name(x @ self.w_up.value, "mlp_in")
    h = constrain(jax.nn.silu(gate) * up, ("batch", "length", "act_mlp"))
    return checkpoint_name(h @ self.w_down.value, "mlp_out")


def timestep_embedding(t, dim, max_period=10_000.0):
  """Sinusoidal embedding of t in [0, 1] (scaled by 1000, as in diffusers / FLUX)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[..., None] * freqs
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class TokenDiffusionHead(nnx.Module):
  """MAR's per-token diffusion MLP (Harmon, MAR: SimpleMLPAdaLN): predicts one image token's
  flow output (velocity or x0, model.prediction) from its noised value x_t [..., D], its time
  t [...] and the transformer's output z [..., W] at that token. z plus the embedded t is the
  condition c; `depth` residual blocks each modulate an RMS-normed stream by shift / scale /
  gate from c (adaLN) and apply a SiLU MLP; the output projection starts at zero."""

  def __init__(self, token_dim, cond_dim, width, depth, *, rngs):
    std = lambda n: 1.0 / math.sqrt(n)
    self.x_in = param(rngs, (token_dim, width), ("patch", "mlp"), std(token_dim))
    self.z_in = param(rngs, (cond_dim, width), ("embed", "mlp"), std(cond_dim))
    self.t_in = param(rngs, (256, width), (None, "mlp"), std(256))
    self.ada = param(rngs, (depth + 1, width, 3 * width), (None, "mlp", None), zeros=True)
    self.w1 = param(rngs, (depth, width, width), (None, "mlp", None), std(width))
    self.w2 = param(rngs, (depth, width, width), (None, None, "mlp"), std(width))
    self.out = param(rngs, (width, token_dim), ("mlp", "patch"), zeros=True)
    self.depth = depth

  def __call__(self, x_t, t, z):
    dtype = self.x_in.value.dtype
    c = jax.nn.silu(z.astype(dtype) @ self.z_in.value
                    + timestep_embedding(t, 256).astype(dtype) @ self.t_in.value)
    h = x_t.astype(dtype) @ self.x_in.value
    norm = lambda v: v * jax.lax.rsqrt(jnp.mean(jnp.square(v), -1, keepdims=True) + 1e-6)
    for i in range(self.depth):
      shift, scale, gate = jnp.split(c @ self.ada.value[i], 3, axis=-1)
      y = norm(h) * (1.0 + scale) + shift
      h = h + gate * (jax.nn.silu(y @ self.w1.value[i]) @ self.w2.value[i])
    shift, scale, _ = jnp.split(c @ self.ada.value[self.depth], 3, axis=-1)
    return ((norm(h) * (1.0 + scale) + shift) @ self.out.value).astype(jnp.float32)


class Block(nnx.Module):
  """Pre-norm transformer block: attention then a feed-forward (SwiGLU, or a routed MoE
  in the blocks model.moe selects), each residual.

  Mixture of transformers (model.mot.route with more than one expert): the block holds
  further copies of its norms, projections and feed-forward in `modality_experts`;
  each token uses those of its modality's expert, and all tokens share one attention.
  """

  def __init__(self, cfg, *, rngs, layer=0, modality_experts=True):
    self.attn_norm = RMSNorm(cfg.width, rngs=rngs, eps=cfg.norm_eps)
    self.attn = Attention(cfg, rngs=rngs)
    self.mlp_norm = RMSNorm(cfg.width, rngs=rngs, eps=cfg.norm_eps)
    if is_moe_layer(cfg, layer):
      from unimm.models.moe import MoE
      self.mlp = MoE(cfg.width, cfg.moe, cfg.mlp_dim, cfg.depth, rngs=rngs)
    else:
      self.mlp = SwiGLU(cfg.width, cfg.mlp_dim, cfg.depth, rngs=rngs)
    route = tuple(cfg.mot.route) if modality_experts else (0,)
    self.route = route
    self.modality_experts = nnx.List([Block(cfg, rngs=rngs, layer=layer, modality_experts=False)
                                      for _ in range(max(route))])

  def ffn(self, x, tokens):
    """The feed-forward of this block (or modality expert); tokens [B, L] bool: the tokens
    whose output is used (a routed MoE routes only those: not padding, nor in a mixture of
    transformers another expert's tokens); its losses and statistics go to the loss."""
    if isinstance(self.mlp, SwiGLU):
      return self.mlp(self.mlp_norm(x))
    y, aux = self.mlp(self.mlp_norm(x), tokens)
    self.sow(nnx.Intermediate, "moe", aux)
    return y

  def __call__(self, x, ids, rope_pos, cache=None, cache_index=None):
    act = ("batch", "length", "act_embed")
    if not len(self.modality_experts):
      h, cache = self.attn(self.attn_norm(x), ids, rope_pos, cache, cache_index)
      x = constrain(x + h, act)
      return constrain(x + self.ffn(x, ids.segment > 0), act), cache
    parts = [self, *self.modality_experts]
    expert = jnp.asarray(self.route, jnp.int32)[ids.modality]

    def pick(values):  # per token, the value of its modality's expert
      def one(*xs):
        out = xs[0]
        for m, x in enumerate(xs[1:], 1):
          out = jnp.where((expert == m).reshape(expert.shape + (1,) * (x.ndim - 2)), x, out)
        return out
      return jax.tree.map(one, *values)

    q, k, v = pick([p.attn.qkv(p.attn_norm(x), rope_pos) for p in parts])
    o, cache = cached_attention(q, k, v, ids, cache, cache_index, self.attn.impl)
    x = constrain(x + pick([p.attn.out(o) for p in parts]), act)
    real = ids.segment > 0
    return constrain(x + pick([p.ffn(x, real & (expert == m)) for m, p in enumerate(parts)]),
                     act), cache


def is_moe_layer(cfg, layer):
  """Whether block `layer` routes its feed-forward (model.moe: experts, every, dense_layers)."""
  moe = cfg.moe
  return moe.experts > 0 and (layer + 1) % moe.every == 0 and layer not in tuple(moe.dense_layers)


# ------------------------------------------------------------------ the block stack

def _kernel_output(prim):
  """Outputs of fused kernels (Pallas flash attention and grouped matmuls, cuDNN attention):
  kept under every policy but "full", or the backward would run the forward kernel again to
  rebuild its residuals (a custom VJP's residuals are not visible to name-based policies)."""
  return prim.name == "pallas_call" or prim.name.startswith("dot_product_attention_fwd")


def _with_kernels(policy):
  return lambda prim, *avals, **params: _kernel_output(prim) or policy(prim, *avals, **params)


# the tensors offloaded by "offload", by the names the layers give them (checkpoint_name)
OFFLOADED = ["qkv", "context", "attn_out", "mlp_in", "mlp_out"]

# model.remat: what each block keeps for the backward pass (MaxText's remat_policy, by name)
REMAT = {
    "none": None,  # no rematerialisation: every activation the backward needs is kept
    "full": jax.checkpoint_policies.nothing_saveable,  # only the block's input; all recomputed
    # outputs of the weight matmuls (q/k/v, out, MLP) and of attention; elementwise ops recomputed
    "save_dots": _with_kernels(jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("context"))),
    # the same tensors (by name), moved to host memory until the backward needs them
    "offload": _with_kernels(jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=OFFLOADED,
        offload_src="device", offload_dst="pinned_host")),
}


def check_remat(name):
  if name not in REMAT:
    raise UserError(f"model.remat='{name}' is unknown: use one of {', '.join(REMAT)}")
  return name


def pop_router_stats(module):
  """The MoE statistics the routed blocks under `module` sowed in this forward pass (a list
  of dicts of arrays), removed from the module."""
  sown = nnx.pop(module, nnx.Intermediate)
  found = jax.tree.leaves(sown, is_leaf=lambda x: isinstance(x, dict) and "lb_loss" in x)
  return [a for a in found if isinstance(a, dict)]


def scan_units(blocks):
  """Blocks grouped for `jax.lax.scan`: a list of (first block, period p, repeats r); blocks
  first + t p + j (t < r) share one structure for each j, so r units of p blocks scan as one.
  Takes the longest run at each block (the smallest period among equals): dense blocks before
  routed ones give (0, 1, n_dense), (n_dense, 1, n_moe); alternating dense / routed blocks
  give one unit of period 2."""
  sig = []
  for b in blocks:
    graph, state = nnx.split(b)
    sig.append((graph, tuple((tuple(x.shape), str(x.dtype)) for x in jax.tree.leaves(state))))
  units, i, n = [], 0, len(sig)
  while i < n:
    best = (1, 1)  # (period, repeats)
    for p in range(1, (n - i) // 2 + 1):
      r = 1
      while i + (r + 1) * p <= n and sig[i + r * p:i + (r + 1) * p] == sig[i:i + p]:
        r += 1
      if r > 1 and p * r > best[0] * best[1]:
        best = (p, r)
    units.append((i, *best))
    i += best[0] * best[1]
  return units


def run_blocks(blocks, x, ids, rope_pos, *, scan=False, remat="none", cache=None, cache_index=None):
  """x through `blocks` in order. Returns (x, new cache or None, MoE statistics: a dict of
  arrays with one row per routed feed-forward, in block order, or None).

  scan: repeated units of blocks (`scan_units`) run as `jax.lax.scan` over their stacked
  parameters (one traced body per unit, not per block; the parameters keep their per-block
  layout, so checkpoints do not change). remat: `REMAT[remat]` around each block (or scanned
  unit). A KV cache (sampling) always takes the loop."""
  policy = REMAT[check_remat(remat)]
  stats = []

  def blocks_fn(graphs):
    """(x, parameters of blocks `graphs`) -> (x, [stats per routed FFN]), under the remat policy."""
    def apply(x, states):
      out = []
      for graph, state in zip(graphs, states):
        block = nnx.merge(graph, state)
        x, _ = block(x, ids, rope_pos)
        out += pop_router_stats(block)
      return x, out
    return apply if remat == "none" else jax.checkpoint(apply, policy=policy)

  if cache is not None or not scan:
    new_cache = [] if cache is not None else None
    for i, block in enumerate(blocks):
      if cache is not None:
        x, c = block(x, ids, rope_pos, cache[i], cache_index)
        new_cache.append(c)
        found = pop_router_stats(block)
      else:
        graph, state = nnx.split(block)
        x, found = blocks_fn((graph,))(x, (state,))
      stats += [jax.tree.map(lambda a: a[None], f) for f in found]
    return x, new_cache, _concat(stats)
  for first, period, repeats in scan_units(blocks):
    split = [nnx.split(blocks[first + t * period + j]) for t in range(repeats) for j in range(period)]
    graphs = tuple(g for g, _ in split[:period])
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *[split[t * period + j][1] for t in range(repeats)])
               for j in range(period)]
    x, found = jax.lax.scan(blocks_fn(graphs), x, stacked)
    if found:  # [repeats] per routed FFN of the unit -> rows in block order
      per_step = jax.tree.map(lambda *xs: jnp.stack(xs, axis=1), *found)
      stats.append(jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), per_step))
  return x, None, _concat(stats)


def _concat(stats):
  """Rows of MoE statistics (dicts of [n, ...] arrays) -> one dict, or None."""
  if not stats:
    return None
  return jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *stats)
