"""Flash attention over the unified mask on TPU (Pallas Mosaic), forward and backward.

`flash_attention(q, k, v, ids)` is self-attention over whole packed rows with the mask of
`unimm.kernels.mask`, built tile by tile from the packed ids and never as [L, L].

Grid. Forward and dq: (batch, head, q block, kv block), the kv axis sequential, with f32
VMEM accumulators (running max and sum in [bq, 128] lanes, output / dq in [bq, D]); the
forward saves the output and the logsumexp. dk / dv: (batch, kv head, kv block, head in
group, q block), the last two sequential: each kv block accumulates over its group's query
heads and query blocks, so grouped-query k / v are read per kv head (index map h // group),
never repeated, and dk / dv come out summed per group. The dk / dv kernel works on the
transposed tile (keys on sublanes, queries on lanes), so dV += P^T dO and dK += dS^T Q are
plain matmuls and the query-side logsumexp and di = rowsum(dO * O) are lane vectors.

Skipping. `block_ranges` and `full_tiles` are scalar-prefetched (SMEM, flattened int32; the
full flags take B * nQ * nK words): a tile outside its block's range is skipped (`pl.when`),
and the index maps clamp the block index into the range, so it does not change on skipped
steps and nothing new is fetched for them. A full tile runs without any mask arithmetic; the
others build the tile's mask with `mask.tile_mask` from the packed ids.

Ids layout. Each of the packed code and position (`mask.pack`) is passed twice, as the
reference kernel lays out segment ids: [B, L, 128] (a token per sublane row, broadcast over
the lanes) for the tokens along a tile's rows, and [B, 8, L] (a token per lane, broadcast over
8 sublanes) for those along its lanes; in the kernel the first is tiled to the tile's width.
The logsumexp travels the same way: [B, H, L, 128] to dq (which computes di from its O and
dO blocks), [B, H, 8, L] with di to dk / dv.

Layout of q / k / v. With D a multiple of 128 the kernels read [B, L, heads * D] (a reshape;
a block is one head's D lanes); otherwise [B, heads, L, D] (a transpose). D must be a
multiple of 128 or below it.

Blocks. 512 queries x 1024 keys by default (the class splash attention is commonly run with
on v5p; not tuned on hardware here), the same for all three kernels so the tile tables
are computed once; for rows not divisible by them, the largest multiple of 128 up to the
default that divides L (`block_sizes`). At the defaults a step holds a [512, 1024] f32
score tile (2 MiB) and its mask operands in VMEM; the kernels compile for v5p within the
default scoped VMEM limit.

Sharding: XLA cannot partition a Mosaic kernel; `unimm.kernels.attention` calls this one per
device shard (`jax.shard_map`).
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from unimm.kernels import mask as M

BLOCK_Q, BLOCK_K = 512, 1024
LANES, SUBLANES = 128, 8
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
NT = (((1,), (1,)), ((), ()))  # a @ b.T


class Tables(NamedTuple):
  """Per-row tile tables and packed ids, small ([B, L] at most): what the kernels prefetch
  (ranges and full flags, flattened int32) and the ids they build mask tiles from."""
  kv_lo: jax.Array  # [B * nQ] first key block of each query block
  kv_hi: jax.Array  # [B * nQ] last key block
  q_lo: jax.Array   # [B * nK] first query block of each key block
  q_hi: jax.Array   # [B * nK] last query block
  full: jax.Array   # [B * nQ * nK] 1 where the tile needs no mask
  code: jax.Array   # [B, L] packed ids (`mask.pack`)
  pos: jax.Array    # [B, L]


def tables(ids: M.MaskIds, block_q: int, block_k: int) -> Tables:
  """The tile tables of a batch of rows for the given blocks."""
  (kv_lo, kv_hi), (q_lo, q_hi) = M.block_ranges(ids, block_q, block_k)
  full = M.full_tiles(ids, block_q, block_k)
  code, pos = M.pack(ids)
  flat = lambda x: x.reshape(-1).astype(jnp.int32)
  return Tables(flat(kv_lo), flat(kv_hi), flat(q_lo), flat(q_hi), flat(full), code, pos)


def _cols(x):
  """[B, ..., L] -> [B, ..., L, 128]: each token on a sublane row, broadcast over the lanes."""
  return jnp.broadcast_to(x[..., None], (*x.shape, LANES))


def _rows(x):
  """[B, ..., L] -> [B, ..., 8, L]: each token in a lane, broadcast over 8 sublanes."""
  return jnp.broadcast_to(x[..., None, :], (*x.shape[:-1], SUBLANES, x.shape[-1]))


def _lanes(x, n):
  """[r, 128] (equal lanes) -> [r, n]."""
  return jnp.tile(x, (1, n // LANES)) if n % LANES == 0 else x[:, :n]


def _tile_mask(r_code, r_pos, l_code, l_pos, queries_on_rows):
  """A tile's bool mask from the ids blocks: r_* [r, 128] (`_cols`) for the tokens along its
  rows, l_* [8, n] (`_rows`) for those along its lanes -> [r, n]: keys on lanes when
  `queries_on_rows`, else the transposed tile (queries on lanes)."""
  n = l_code.shape[-1]
  rows = _lanes(r_code[...], n), _lanes(r_pos[...], n)
  lanes = l_code[:1, :], l_pos[:1, :]
  return M.tile_mask(*rows, *lanes) if queries_on_rows else M.tile_mask(*lanes, *rows)


def _visit(body, lo, hi, t, full):
  """Runs body(masked) when block t lies in [lo, hi]: unmasked on a full tile (full != 0)."""
  inside = (lo <= t) & (t <= hi)
  pl.when(inside & (full != 0))(lambda: body(False))
  pl.when(inside & (full == 0))(lambda: body(True))


def _clamp(t, lo, hi):
  """t clamped into [lo, hi]: a skipped step keeps the block of its neighbour in range."""
  return jnp.minimum(jnp.maximum(t, lo), hi)


def _fwd_kernel(kv_lo, kv_hi, full, q_ref, k_ref, v_ref, q_code, q_pos, k_code, k_pos,
                o_ref, lse_ref, m_ref, l_ref, acc_ref, *, scale, nq, nk):
  """One (batch, head, q block, kv block) step of the forward: online softmax over the row's
  key blocks; the output and logsumexp are written at the last one."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + i
  bk, d = k_ref.shape[0], acc_ref.shape[-1]

  @pl.when(j == 0)
  def _init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def tile(masked):
    s = jax.lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32) * scale
    if masked:
      s = jnp.where(_tile_mask(q_code, q_pos, k_code, k_pos, True), s, MASK_VALUE)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
    p = jnp.exp(s - _lanes(m_next, bk))
    alpha = jnp.exp(m_prev - m_next)
    l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
    m_ref[...] = m_next
    pv = jax.lax.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * _lanes(alpha, d) + pv

  _visit(tile, kv_lo[row], kv_hi[row], j, full[row * nk + j])

  @pl.when(j == nk - 1)
  def _out():
    l = l_ref[...]
    o_ref[...] = (acc_ref[...] * _lanes(1.0 / l, d)).astype(o_ref.dtype)
    lse_ref[...] = m_ref[...] + jnp.log(l)


def _dq_kernel(kv_lo, kv_hi, full, q_ref, k_ref, v_ref, o_ref, do_ref, q_code, q_pos, k_code,
               k_pos, lse_ref, dq_ref, di_ref, acc_ref, *, scale, nq, nk):
  """One (batch, head, q block, kv block) step of dq = scale * dS K, dS = P * (dO V^T - di);
  di = rowsum(dO * O) of the query block is computed at its first step."""
  b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
  row = b * nq + i
  bk = k_ref.shape[0]

  @pl.when(j == 0)
  def _init():
    od = o_ref[...].astype(jnp.float32) * do_ref[...].astype(jnp.float32)
    di_ref[...] = jnp.broadcast_to(jnp.sum(od, axis=1, keepdims=True), di_ref.shape)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  def tile(masked):
    k = k_ref[...]
    s = jax.lax.dot_general(q_ref[...], k, NT, preferred_element_type=jnp.float32) * scale
    if masked:
      s = jnp.where(_tile_mask(q_code, q_pos, k_code, k_pos, True), s, MASK_VALUE)
    p = jnp.exp(s - _lanes(lse_ref[...], bk))
    dp = jax.lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _lanes(di_ref[...], bk))
    acc_ref[...] += jax.lax.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

  _visit(tile, kv_lo[row], kv_hi[row], j, full[row * nk + j])

  @pl.when(j == nk - 1)
  def _out():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_lo, q_hi, full, q_ref, k_ref, v_ref, do_ref, k_code, k_pos, q_code, q_pos,
                lse_ref, di_ref, dk_ref, dv_ref, dk_acc, dv_acc, *, scale, nq, nk, group):
  """One (batch, kv head, kv block, head in group, q block) step of dv = P^T dO and
  dk = scale * dS^T Q, on the transposed tile (keys on rows)."""
  b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)
  col = b * nk + j

  @pl.when((g == 0) & (i == 0))
  def _init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

  def tile(masked):  # transposed: keys on rows, queries on lanes
    q, do = q_ref[...], do_ref[...]
    st = jax.lax.dot_general(k_ref[...], q, NT, preferred_element_type=jnp.float32) * scale
    if masked:
      st = jnp.where(_tile_mask(k_code, k_pos, q_code, q_pos, False), st, MASK_VALUE)
    pt = jnp.exp(st - lse_ref[:1, :])
    dv_acc[...] += jax.lax.dot(pt.astype(do.dtype), do, preferred_element_type=jnp.float32)
    dpt = jax.lax.dot_general(v_ref[...], do, NT, preferred_element_type=jnp.float32)
    dst = pt * (dpt - di_ref[:1, :])
    dk_acc[...] += jax.lax.dot(dst.astype(q.dtype), q, preferred_element_type=jnp.float32)

  _visit(tile, q_lo[col], q_hi[col], i, full[(b * nq + i) * nk + j])

  @pl.when((g == group - 1) & (i == nq - 1))
  def _out():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _to_kernel(x):
  """[B, L, N, D] -> the kernels' layout: [B, L, N * D] when D is lane-aligned, else
  [B, N, L, D]."""
  b, l, n, d = x.shape
  return x.reshape(b, l, n * d) if d % LANES == 0 else x.transpose(0, 2, 1, 3)


def _from_kernel(y, shape):
  """The kernels' layout -> [B, L, N, D]."""
  return y.reshape(shape) if shape[-1] % LANES == 0 else y.transpose(0, 2, 1, 3)


def _block(shape, place, where):
  """BlockSpec of `shape` at place(batch, head, block), where(*grid, *prefetch) giving those."""
  return pl.BlockSpec(shape, lambda *a: place(*where(*a)))


def _spec(d, n, where):
  """n tokens of one head ([n, d] in the kernel) in the `_to_kernel` layout."""
  if d % LANES == 0:
    return _block((None, n, d), lambda b, h, t: (b, t, h), where)
  return _block((None, None, n, d), lambda b, h, t: (b, h, t, 0), where)


def _col_spec(n, where, heads=False):
  """n tokens of a `_cols` array: [B, L, 128], or [B, H, L, 128] with `heads`."""
  if heads:
    return _block((None, None, n, LANES), lambda b, h, t: (b, h, t, 0), where)
  return _block((None, n, LANES), lambda b, h, t: (b, t, 0), where)


def _row_spec(n, where, heads=False):
  """n tokens of a `_rows` array: [B, 8, L], or [B, H, 8, L] with `heads`."""
  if heads:
    return _block((None, None, SUBLANES, n), lambda b, h, t: (b, h, 0, t), where)
  return _block((None, SUBLANES, n), lambda b, h, t: (b, 0, t), where)


def _params(parallel, arbitrary):
  """The grid's leading `parallel` axes split across cores, the rest sequential."""
  return pltpu.CompilerParams(
      dimension_semantics=("parallel",) * parallel + ("arbitrary",) * arbitrary)


def _by_query_block(nq, group):
  """Index maps of the (batch, head, q block, kv block) grid: the query block's own, and the
  key block clamped into the block's range (kv head = head // group)."""
  own = lambda b, h, i, j, *_: (b, h, i)
  kv = lambda b, h, i, j, lo, hi, f: (
      b, jax.lax.div(h, group), _clamp(j, lo[b * nq + i], hi[b * nq + i]))
  return own, kv


def _forward(q, k, v, t: Tables, bq, bk, interpret):
  """(o [B, L, H, D], lse [B, H, L] f32)."""
  b, l, h, d = q.shape
  group, nq, nk = h // k.shape[2], l // bq, l // bk
  own, kv = _by_query_block(nq, group)
  o, lse = pl.pallas_call(
      functools.partial(_fwd_kernel, scale=d ** -0.5, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, h, nq, nk),
          in_specs=[_spec(d, bq, own), _spec(d, bk, kv), _spec(d, bk, kv),
                    _col_spec(bq, own), _col_spec(bq, own), _row_spec(bk, kv), _row_spec(bk, kv)],
          out_specs=[_spec(d, bq, own), _col_spec(bq, own, heads=True)],
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32),
                          pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(_to_kernel(q).shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, l, LANES), jnp.float32)],
      compiler_params=_params(3, 1), interpret=interpret, name="flash_tpu_fwd",
  )(t.kv_lo, t.kv_hi, t.full, _to_kernel(q), _to_kernel(k), _to_kernel(v),
    _cols(t.code), _cols(t.pos), _rows(t.code), _rows(t.pos))
  return _from_kernel(o, q.shape), lse[..., 0]


def _backward(q, k, v, o, lse, do, t: Tables, bq, bk, interpret):
  """(dq, dk, dv)."""
  b, l, h, d = q.shape
  n_kv = k.shape[2]
  group, nq, nk = h // n_kv, l // bq, l // bk
  qk, kk, vk, ok, dok = (_to_kernel(x) for x in (q, k, v, o, do))

  own, kv = _by_query_block(nq, group)
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, scale=d ** -0.5, nq=nq, nk=nk),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, h, nq, nk),
          in_specs=[_spec(d, bq, own), _spec(d, bk, kv), _spec(d, bk, kv), _spec(d, bq, own),
                    _spec(d, bq, own), _col_spec(bq, own), _col_spec(bq, own), _row_spec(bk, kv),
                    _row_spec(bk, kv), _col_spec(bq, own, heads=True)],
          out_specs=_spec(d, bq, own),
          scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(qk.shape, q.dtype),
      compiler_params=_params(3, 1), interpret=interpret, name="flash_tpu_dq",
  )(t.kv_lo, t.kv_hi, t.full, qk, kk, vk, ok, dok, _cols(t.code), _cols(t.pos), _rows(t.code),
    _rows(t.pos), _cols(lse))

  # dk / dv grid (batch, kv head, kv block, head in group, q block): the query block is
  # clamped into the key block's range
  qb = lambda b, hk, j, g, i, lo, hi, f: (
      b, hk * group + g, _clamp(i, lo[b * nk + j], hi[b * nk + j]))
  mine = lambda b, hk, j, *_: (b, hk, j)
  di = jnp.einsum("blhd,blhd->bhl", o.astype(jnp.float32), do.astype(jnp.float32))
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=d ** -0.5, nq=nq, nk=nk, group=group),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=3, grid=(b, n_kv, nk, group, nq),
          in_specs=[_spec(d, bq, qb), _spec(d, bk, mine), _spec(d, bk, mine), _spec(d, bq, qb),
                    _col_spec(bk, mine), _col_spec(bk, mine), _row_spec(bq, qb), _row_spec(bq, qb),
                    _row_spec(bq, qb, heads=True), _row_spec(bq, qb, heads=True)],
          out_specs=[_spec(d, bk, mine), _spec(d, bk, mine)],
          scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)]),
      out_shape=[jax.ShapeDtypeStruct(kk.shape, k.dtype),
                 jax.ShapeDtypeStruct(vk.shape, v.dtype)],
      compiler_params=_params(3, 2), interpret=interpret, name="flash_tpu_dkv",
  )(t.q_lo, t.q_hi, t.full, qk, kk, vk, dok, _cols(t.code), _cols(t.pos), _rows(t.code),
    _rows(t.pos), _rows(lse), _rows(di))
  return _from_kernel(dq, q.shape), _from_kernel(dk, k.shape), _from_kernel(dv, v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, t: Tables, bq, bk, interpret):
  return _forward(q, k, v, t, bq, bk, interpret)[0]


def _flash_fwd(q, k, v, t, bq, bk, interpret):
  o, lse = _forward(q, k, v, t, bq, bk, interpret)
  return o, (q, k, v, t, o, lse)


def _flash_bwd(bq, bk, interpret, res, do):
  q, k, v, t, o, lse = res
  return (*_backward(q, k, v, o, lse, do, t, bq, bk, interpret), None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def block_sizes(length, block_q=None, block_k=None):
  """(block_q, block_k) for rows of `length`: the given blocks, checked, or the defaults
  (BLOCK_Q, BLOCK_K), each lowered to the largest multiple of 128 that divides the length."""

  def one(given, default, what):
    if given is None:
      fits = [n for n in range(LANES, min(default, length) + 1, LANES) if length % n == 0]
      given = fits[-1] if fits else default
    if given % LANES or length % given:
      raise ValueError(f"flash attention needs {what} a multiple of {LANES} dividing the "
                       f"sequence length {length}, got {given}")
    return given

  return one(block_q, BLOCK_Q, "block_q"), one(block_k, BLOCK_K, "block_k")


def flash_attention(q, k, v, ids: M.MaskIds, *, block_q=None, block_k=None, interpret=False):
  """Masked attention over the unified mask of `ids` (self-attention over whole rows):
  q [B, L, H, D], k / v [B, L, KV, D] (H a multiple of KV) -> [B, L, H, D] in q's dtype, scale
  1/sqrt(D). Blocks: `block_sizes`. `interpret` runs the kernels in the Pallas interpreter
  (any backend, for tests)."""
  b, l, h, d = q.shape
  if k.shape != v.shape or k.shape[:2] != (b, l) or k.shape[3] != d or h % k.shape[2]:
    raise ValueError(f"flash attention needs q [B, L, H, D] and k, v [B, L, KV, D] with H a "
                     f"multiple of KV, got q {q.shape}, k {k.shape}, v {v.shape}")
  if d > LANES and d % LANES:
    raise ValueError(f"flash attention needs a head dim below {LANES} or a multiple of it, got {d}")
  if ids.segment.shape != (b, l):
    raise ValueError(f"mask ids {ids.segment.shape} do not match q {q.shape}")
  bq, bk = block_sizes(l, block_q, block_k)
  return _flash(q, k, v, tables(ids, bq, bk), bq, bk, interpret)
