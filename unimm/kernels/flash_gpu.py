"""Flash attention over the unified mask for GPUs: Pallas Triton kernels, forward and backward.

Each program owns one block of rows (queries in the forward and dq kernels, keys in the dk / dv
kernel) and loops over the blocks of the other side that the mask can reach, the interval
`mask.block_ranges` gives, never the whole row. It rebuilds each tile's mask from the packed
ids (`mask.tile_mask`) unless `mask.full_tiles` flags the tile as all-allowed: a per-tile
`lax.cond` (an scf.if in Triton) around the mask arithmetic only, while the loads and dots
stay outside it, where Triton's software pipeliner sees them. Nothing of size [L, L] exists,
in the kernels or in the XLA glue: the tables are [B, L] ids, [B, L / block] ranges and
[B, L / block_q, L / block_k] flags (`Plan`).

Forward (grid: query blocks x batch x heads, the last query block first: later blocks see
more keys, so the longest programs start first and the launch ends on short ones): online
softmax in float32 in base 2 (scores scaled by scale * log2(e) in one multiply-add before
`exp2`), bf16 (or f32) dot inputs with f32 accumulation; writes the output and the
logsumexp (natural log, float32 [B, H, L]). Masked scores are -inf and the running max
starts at -1e30, so a fully masked tile adds exactly nothing and needs no guard in the loop;
a row with no visible key (none with valid ids: each token sees itself) gets output 0 and
logsumexp +inf, which makes its probabilities 0 in the backward.

Backward (a custom VJP): delta = rowsum(o * do) in a small kernel, then two kernels without
atomics: dq (grid: query blocks x batch x heads, last first, looping over key blocks) and
dk / dv (grid: key blocks x batch x kv heads, looping over the heads of its group and, for
each, over the query blocks that can see the key block; the group's sum is accumulated in
registers, so grouped-query heads cost no extra memory). Key / value heads are read as
h // (H / KV) by the index maps; k and v are never repeated.

Defaults (for Hopper, H100 / H200, bf16, head dim 128; starting points to tune on hardware,
all overridable; no GPU was at hand to measure them):
  forward   block_q 128, block_k 64. 128 query rows fill the wgmma tiles (64 rows per
            warpgroup) and halve the K / V reads per query against 64; 64-key steps waste half
            as much as 128 on the partly masked tiles at document and image edges, and at
            D = 128 leave room for 3 pipeline stages of K and V (3 x 32 KiB) beside Q (32 KiB)
            in the 228 KiB of shared memory, where 128 x 128 fits only 2. This is inside the
            space the Triton FA2 tutorial autotunes (64 / 128 x 32 / 64 / 128, 4 / 8 warps,
            2-4 stages); jax's reference kernel fixes 128 x 128, 8 warps, 2 stages.
            num_warps 4 up to head dim 64, else 8 (two warpgroups share the [128, D] f32
            accumulator and [128, 64] scores instead of spilling); num_stages 3, 2 above head
            dim 128.
  backward  a program owns 128 rows (block_outer_bwd) and steps 32 (block_inner_bwd): the
            Triton FA2 tutorial's backward shape (dk / dv over 128 keys stepping 32 queries,
            dq over 128 queries stepping 32 keys), which keeps the two [128, D] f32
            accumulators in registers with small [128, 32] score tiles. num_warps 4 up to head
            dim 64, else 8 (the tutorial uses 4, but at D = 128 the two accumulators alone
            would take 256 registers a thread);
            num_stages 3, 2 above head dim 128. (jax's reference uses 32 x 32 blocks, 4 warps.)
Blocks are clipped to the row length, which must be a multiple of every block; the delta
kernel uses the backward's outer block.
"""

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from unimm.kernels import mask as M

LOG2E, LN2 = math.log2(math.e), math.log(2.0)
MAX_INIT = -1e30  # the running max starts here: finite, so exp2(max - new max) is never NaN


@dataclasses.dataclass(frozen=True)
class Config:
  """Block sizes and Triton launch parameters of the forward, dq and dk / dv kernels (see the
  module's docstring for the defaults)."""
  block_q: int          # forward: query rows per program
  block_k: int          # forward: key rows per loop step
  block_outer_bwd: int  # backward: rows a program owns (queries in dq, keys in dk / dv)
  block_inner_bwd: int  # backward: rows per loop step (keys in dq, queries in dk / dv)
  num_warps: int
  num_stages: int
  interpret: bool = False  # Pallas interpret mode (CPU tests)


def make_config(length, head_dim, *, block_q=128, block_k=64, block_outer_bwd=128,
                block_inner_bwd=32, num_warps=None, num_stages=None, interpret=False):
  """The `Config` for rows of `length` and heads of `head_dim`: blocks clipped to the length
  (each a power of two >= 16 dividing it, else ValueError); num_warps / num_stages by head dim
  unless given."""
  blocks = dict(block_q=block_q, block_k=block_k, block_outer_bwd=block_outer_bwd,
                block_inner_bwd=block_inner_bwd)
  blocks = {name: min(b, length) for name, b in blocks.items()}
  for name, b in blocks.items():
    if b < 16 or b & (b - 1) or length % b:
      raise ValueError(f"flash attention: {name}={b} must be a power of two >= 16 dividing the "
                       f"sequence length {length} (pad rows to a multiple of 128)")
  return Config(**blocks, num_warps=num_warps or (4 if head_dim <= 64 else 8),
                num_stages=num_stages or (3 if head_dim <= 128 else 2), interpret=interpret)


class Plan(NamedTuple):
  """What the kernels read of the mask, all int32: the packed ids and, per kernel, the
  inclusive interval of blocks each program visits and the flags of tiles needing no mask."""
  code: jax.Array      # [B, L] segment << 15 | image << 1 | noised (`mask.pack`)
  pos: jax.Array       # [B, L] position in the document
  fwd_lo: jax.Array    # [B, L / block_q] first key block (of block_k) of each query block
  fwd_hi: jax.Array    # [B, L / block_q] last one
  fwd_full: jax.Array  # [B, L / block_q, L / block_k] 1: the tile needs no mask
  dq_lo: jax.Array     # [B, L / outer] first key block (of inner) of each query block
  dq_hi: jax.Array     # [B, L / outer]
  dq_full: jax.Array   # [B, L / outer, L / inner] (query block, key block)
  dkv_lo: jax.Array    # [B, L / outer] first query block (of inner) that sees each key block
  dkv_hi: jax.Array    # [B, L / outer]
  dkv_full: jax.Array  # [B, L / outer, L / inner] (key block, query block)


def plan(ids: M.MaskIds, config: Config) -> Plan:
  """The tables of `Plan` for self-attention over whole rows with these ids."""
  code, pos = M.pack(ids)
  full = lambda bq, bk: M.full_tiles(ids, bq, bk).astype(jnp.int32)
  (fwd_lo, fwd_hi), _ = M.block_ranges(ids, config.block_q, config.block_k)
  outer, inner = config.block_outer_bwd, config.block_inner_bwd
  (dq_lo, dq_hi), _ = M.block_ranges(ids, outer, inner)
  _, (dkv_lo, dkv_hi) = M.block_ranges(ids, inner, outer)
  return Plan(code, pos, fwd_lo, fwd_hi, full(config.block_q, config.block_k),
              dq_lo, dq_hi, full(outer, inner), dkv_lo, dkv_hi,
              jnp.swapaxes(full(inner, outer), 1, 2))


def flash_attention(q, k, v, ids: M.MaskIds, *, block_q=128, block_k=64, block_outer_bwd=128,
                    block_inner_bwd=32, num_warps=None, num_stages=None, interpret=False):
  """Self-attention under the unified mask of `ids` (the same for queries and keys):
  q [B, L, H, D], k / v [B, L, KV, D] (H a multiple of KV) -> [B, L, H, D] in q's dtype,
  scale 1/sqrt(D). Differentiable in q, k and v. A head dim that is not a power of two
  >= 16 is zero-padded to one (the scale stays that of D)."""
  b, length, heads, head_dim = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, length) or k.shape[3] != head_dim:
    raise ValueError(f"flash attention: q {q.shape}, k {k.shape}, v {v.shape} are not "
                     "[B, L, H, D] and [B, L, KV, D] of one row length and head dim")
  if heads % k.shape[2]:
    raise ValueError(f"flash attention: {heads} query heads are not a multiple of "
                     f"{k.shape[2]} key / value heads")
  config = make_config(length, head_dim, block_q=block_q, block_k=block_k,
                       block_outer_bwd=block_outer_bwd, block_inner_bwd=block_inner_bwd,
                       num_warps=num_warps, num_stages=num_stages, interpret=interpret)
  tables, scale = plan(ids, config), head_dim ** -0.5
  padded = max(16, pl.next_power_of_2(head_dim))
  if padded == head_dim:
    return planned_attention(q, k, v, tables, config, scale)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, padded - head_dim)))
  return planned_attention(pad(q), pad(k), pad(v), tables, config, scale)[..., :head_dim]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def planned_attention(q, k, v, tables: Plan, config: Config, scale: float):
  """Attention over exactly the tiles `tables` lists (a tile flagged full unmasked, any other
  visited tile masked by the ids): `flash_attention` with its plan made."""
  return _forward(q, k, v, tables, config, scale)[0]


def _planned_attention_fwd(q, k, v, tables, config, scale):
  out, lse = _forward(q, k, v, tables, config, scale)
  return out, (q, k, v, tables, out, lse)


def _planned_attention_bwd(config, scale, residuals, d_out):
  q, k, v, tables, out, lse = residuals
  delta = _delta(out, d_out, config)
  dq = _dq(q, k, v, d_out, lse, delta, tables, config, scale)
  dk, dv = _dkv(q, k, v, d_out, lse, delta, tables, config, scale)
  return dq, dk, dv, None


planned_attention.defvjp(_planned_attention_fwd, _planned_attention_bwd)


def _masked(full, scores, q_code, q_pos, k_code, k_pos):
  """A tile's scores with its masked pairs at -inf, unless the tile is flagged full."""
  mask = lambda scores: jnp.where(M.tile_mask(q_code, q_pos, k_code, k_pos), scores, -jnp.inf)
  return lax.cond(full != 0, lambda scores: scores, mask, scores)


def _forward_kernel(lo_ref, hi_ref, full_ref, code_ref, pos_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, block_q, block_k, scale):
  """One query block of one head: online softmax over key blocks lo..hi."""
  i = _last_first(pl.program_id(0), pl.num_programs(0))
  rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
  q = q_ref[...]
  q_code, q_pos = code_ref[rows][:, None], pos_ref[rows][:, None]
  log2_scale = scale * LOG2E

  def visit(j, carry):
    acc, row_max, row_sum = carry  # row_max of the scores in log2 units
    cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k, v = k_ref[cols, :], v_ref[cols, :]
    scores = _masked(full_ref[j], pl.dot(q, k, trans_b=True), q_code, q_pos,
                     code_ref[cols][None, :], pos_ref[cols][None, :])
    new_max = jnp.maximum(row_max, jnp.max(scores, axis=1) * log2_scale)
    probs = jnp.exp2(scores * log2_scale - new_max[:, None])
    rescale = jnp.exp2(row_max - new_max)
    acc = acc * rescale[:, None] + pl.dot(probs.astype(v.dtype), v)
    return acc, new_max, row_sum * rescale + jnp.sum(probs, axis=1)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), MAX_INIT, jnp.float32),
          jnp.zeros((block_q,), jnp.float32))
  acc, row_max, row_sum = lax.fori_loop(lo_ref[i], hi_ref[i] + 1, visit, init)
  seen = row_sum > 0
  o_ref[...] = (acc * jnp.where(seen, 1.0 / row_sum, 0.0)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(seen, (row_max + jnp.log2(row_sum)) * LN2, jnp.inf)


def _last_first(step, n):
  """The query block that grid step `step` of `n` computes in the forward and dq kernels."""
  return n - 1 - step


def _query_major_specs(length, block_q, block_k, d, group):
  """BlockSpecs of the forward and dq kernels (grid: query blocks x batch x heads), blocks
  last first: (ranges, full flags, ids, query block, key / value row, per-row statistic)."""
  nq = length // block_q
  blk = lambda i: _last_first(i, nq)
  kv_head = lambda h: lax.div(h, group)
  return dict(
      ranges=pl.BlockSpec((None, nq), lambda i, b, h: (b, 0)),
      full=pl.BlockSpec((None, None, length // block_k), lambda i, b, h: (b, blk(i), 0)),
      ids=pl.BlockSpec((None, length), lambda i, b, h: (b, 0)),
      q=pl.BlockSpec((None, block_q, None, d), lambda i, b, h: (b, blk(i), h, 0)),
      kv=pl.BlockSpec((None, length, None, d), lambda i, b, h: (b, 0, kv_head(h), 0)),
      stat=pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, blk(i))))


def _forward(q, k, v, tables: Plan, config: Config, scale):
  """(out [B, L, H, D], logsumexp float32 [B, H, L])."""
  b, length, heads, d = q.shape
  bq, bk = config.block_q, config.block_k
  spec = _query_major_specs(length, bq, bk, d, heads // k.shape[2])
  kernel = functools.partial(_forward_kernel, block_q=bq, block_k=bk, scale=scale)
  return pl.pallas_call(
      kernel,
      grid=(length // bq, b, heads),
      in_specs=[spec["ranges"], spec["ranges"], spec["full"], spec["ids"], spec["ids"], spec["q"],
                spec["kv"], spec["kv"]],
      out_specs=[spec["q"], spec["stat"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, heads, length), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=config.interpret,
      name="unified_flash_fwd",
  )(tables.fwd_lo, tables.fwd_hi, tables.fwd_full, tables.code, tables.pos, q, k, v)


def _delta_kernel(o_ref, do_ref, delta_ref):
  """rowsum(o * do) of one query block of one head, in float32."""
  delta_ref[...] = jnp.sum(o_ref[...].astype(jnp.float32) * do_ref[...].astype(jnp.float32),
                           axis=1)


def _delta(out, d_out, config: Config):
  """delta = rowsum(out * d_out), float32 [B, H, L]."""
  b, length, heads, d = out.shape
  bq = config.block_outer_bwd
  block = pl.BlockSpec((None, bq, None, d), lambda i, b, h: (b, i, h, 0))
  return pl.pallas_call(
      _delta_kernel,
      grid=(length // bq, b, heads),
      in_specs=[block, block],
      out_specs=pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
      out_shape=jax.ShapeDtypeStruct((b, heads, length), jnp.float32),
      compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
      interpret=config.interpret,
      name="unified_flash_delta",
  )(out, d_out)


def _dq_kernel(lo_ref, hi_ref, full_ref, code_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
               delta_ref, dq_ref, *, block_q, block_k, scale):
  """dq of one query block of one head: dS K summed over key blocks lo..hi."""
  i = _last_first(pl.program_id(0), pl.num_programs(0))
  rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
  q, do = q_ref[...], do_ref[...]
  lse_log2, delta = lse_ref[...] * LOG2E, delta_ref[...]
  q_code, q_pos = code_ref[rows][:, None], pos_ref[rows][:, None]
  log2_scale = scale * LOG2E

  def visit(j, dq):
    cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
    k, v = k_ref[cols, :], v_ref[cols, :]
    scores = _masked(full_ref[j], pl.dot(q, k, trans_b=True), q_code, q_pos,
                     code_ref[cols][None, :], pos_ref[cols][None, :])
    probs = jnp.exp2(scores * log2_scale - lse_log2[:, None])
    d_scores = probs * (pl.dot(do, v, trans_b=True) - delta[:, None])
    return dq + pl.dot(d_scores.astype(k.dtype), k)

  dq = lax.fori_loop(lo_ref[i], hi_ref[i] + 1, visit, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dq(q, k, v, d_out, lse, delta, tables: Plan, config: Config, scale):
  """dq [B, L, H, D]."""
  b, length, heads, d = q.shape
  bq, bk = config.block_outer_bwd, config.block_inner_bwd
  spec = _query_major_specs(length, bq, bk, d, heads // k.shape[2])
  kernel = functools.partial(_dq_kernel, block_q=bq, block_k=bk, scale=scale)
  return pl.pallas_call(
      kernel,
      grid=(length // bq, b, heads),
      in_specs=[spec["ranges"], spec["ranges"], spec["full"], spec["ids"], spec["ids"], spec["q"],
                spec["kv"], spec["kv"], spec["q"], spec["stat"], spec["stat"]],
      out_specs=spec["q"],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=config.interpret,
      name="unified_flash_dq",
  )(tables.dq_lo, tables.dq_hi, tables.dq_full, tables.code, tables.pos, q, k, v, d_out, lse,
    delta)


def _dkv_kernel(lo_ref, hi_ref, full_ref, code_ref, pos_ref, q_ref, k_ref, v_ref, do_ref, lse_ref,
                delta_ref, dk_ref, dv_ref, *, group, block_q, block_k, scale):
  """dk, dv of one key block of one kv head, summed over the query heads of its group and the
  query blocks lo..hi; computed transposed ([keys, queries] tiles) so no dot needs a transpose
  of its result."""
  j = pl.program_id(0)
  cols = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
  k, v = k_ref[...], v_ref[...]
  k_code, k_pos = code_ref[cols][:, None], pos_ref[cols][:, None]
  lo, hi = lo_ref[j], hi_ref[j] + 1
  log2_scale = scale * LOG2E

  def head(g, carry):
    def visit(i, carry):
      dk, dv = carry
      rows = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
      q, do = q_ref[rows, g, :], do_ref[rows, g, :]
      lse_log2, delta = lse_ref[g, rows] * LOG2E, delta_ref[g, rows]
      scores_t = _masked(full_ref[i], pl.dot(k, q, trans_b=True), code_ref[rows][None, :],
                         pos_ref[rows][None, :], k_code, k_pos)
      probs_t = jnp.exp2(scores_t * log2_scale - lse_log2[None, :])
      dv = dv + pl.dot(probs_t.astype(do.dtype), do)
      d_scores_t = probs_t * (pl.dot(v, do, trans_b=True) - delta[None, :])
      return dk + pl.dot(d_scores_t.astype(q.dtype), q), dv

    return lax.fori_loop(lo, hi, visit, carry)

  zeros = jnp.zeros(k.shape, jnp.float32)
  dk, dv = lax.fori_loop(0, group, head, (zeros, zeros))
  dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv(q, k, v, d_out, lse, delta, tables: Plan, config: Config, scale):
  """(dk, dv) [B, L, KV, D], each summed over the query heads of its group."""
  b, length, heads, d = q.shape
  kv_heads = k.shape[2]
  group = heads // kv_heads
  bq, bk = config.block_inner_bwd, config.block_outer_bwd
  nk = length // bk
  row = lambda n: pl.BlockSpec((None, n), lambda j, b, h: (b, 0))
  kv_block = pl.BlockSpec((None, bk, None, d), lambda j, b, h: (b, j, h, 0))
  q_rows = pl.BlockSpec((None, length, group, d), lambda j, b, h: (b, 0, h, 0))
  stats = pl.BlockSpec((None, group, length), lambda j, b, h: (b, h, 0))
  kernel = functools.partial(_dkv_kernel, group=group, block_q=bq, block_k=bk, scale=scale)
  return pl.pallas_call(
      kernel,
      grid=(nk, b, kv_heads),
      in_specs=[row(nk), row(nk),
                pl.BlockSpec((None, None, length // bq), lambda j, b, h: (b, j, 0)),
                row(length), row(length), q_rows, kv_block, kv_block, q_rows, stats, stats],
      out_specs=[kv_block, kv_block],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=config.interpret,
      name="unified_flash_dkv",
  )(tables.dkv_lo, tables.dkv_hi, tables.dkv_full, tables.code, tables.pos, q, k, v, d_out, lse,
    delta)
