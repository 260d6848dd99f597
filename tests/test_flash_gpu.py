"""The GPU flash kernels (unimm.kernels.flash_gpu) in Pallas interpret mode on CPU: values and
gradients against the dense reference, the tiles they visit, and their lowering for CUDA."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_unified_ids
from unimm.kernels import flash_gpu
from unimm.kernels import mask as M

B, L, H, KV, D = 2, 256, 4, 2, 32
BLOCK = 32  # every block of the float32 kernels: 8 x 8 tiles per row
CONFIG = flash_gpu.make_config(L, D, block_q=BLOCK, block_k=BLOCK, block_outer_bwd=BLOCK,
                               block_inner_bwd=BLOCK, interpret=True)
plan = jax.jit(lambda ids: flash_gpu.plan(ids, CONFIG))  # one compile, not one per op


def relative_error(got, want):
  """max |got - want| / max |want|, in float32."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def unified_ids():
  """Row 0: short packed documents (half of them bidirectional: every position 0) and padding;
  row 1: long documents with long images, so some tiles are full (causal text tiles below the
  diagonal, tiles inside one image)."""
  rows = (random_unified_ids(0, 1, L, bidirectional=0.5), random_unified_ids(1, 1, L, max_doc=L, image_len=(40, 100)))
  return M.MaskIds(*(jnp.asarray(np.concatenate(cols)) for cols in zip(*rows)))


def normal(seed, shape, dtype=jnp.float32):
  """Standard normal values of `shape`, from `seed`."""
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def dense_attention(q, k, v, allowed):
  """Softmax attention over the pairs `allowed` ([B, L, L] bool); a row allowed nothing gives 0."""
  group = q.shape[2] // k.shape[2]
  k, v = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
  scores = jnp.where(allowed[:, None], scores, -1e30)
  weights = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)) * allowed[:, None]
  total = jnp.sum(weights, axis=-1, keepdims=True)
  return jnp.einsum("bhqk,bkhd->bqhd", weights / jnp.where(total > 0, total, 1.0), v)


def output_and_grads(attention, q, k, v, d_out):
  """(attention(q, k, v), (dq, dk, dv)) for the output cotangent d_out."""
  out, pullback = jax.vjp(attention, q, k, v)
  return out, pullback(d_out.astype(out.dtype))


@pytest.fixture(scope="module")
def f32_case():
  """ids, (q, k, v), d_out (float32, 4 query heads on 2 kv heads) and the float32 kernels'
  output_and_grads, compiled once, with the plan as an argument."""
  q, k, v = normal(1, (B, L, H, D)), normal(2, (B, L, KV, D)), normal(3, (B, L, KV, D))
  d_out = normal(4, (B, L, H, D))
  run = jax.jit(lambda tables, q, k, v: output_and_grads(
      lambda q, k, v: flash_gpu.planned_attention(q, k, v, tables, CONFIG, D ** -0.5), q, k, v,
      d_out))
  return unified_ids(), (q, k, v), d_out, run


def assert_close(got, want, tol):
  """Outputs and each gradient of two output_and_grads within `tol` relative error."""
  (out, grads), (want_out, want_grads) = got, want
  print("relative error out, dq, dk, dv:", ", ".join(
      f"{relative_error(g, w):.1e}" for g, w in zip((out, *grads), (want_out, *want_grads))))
  assert relative_error(out, want_out) < tol
  for name, g, w in zip(("dq", "dk", "dv"), grads, want_grads):
    assert relative_error(g, w) < tol, name


def test_float32_gqa_matches_reference(f32_case):
  ids, qkv, d_out, run = f32_case
  tables = plan(ids)
  n = L // BLOCK
  blocks = np.arange(n)
  visited = ((blocks >= np.asarray(tables.fwd_lo)[..., None])
             & (blocks <= np.asarray(tables.fwd_hi)[..., None]))
  assert visited.sum() < visited.size / 2  # packing and padding leave most tiles unvisited
  assert (visited & (np.asarray(tables.fwd_full) == 1)).sum() >= 8  # the no-mask branch runs
  got = run(tables, *qkv)
  reference = lambda q, k, v: M.reference_attention(q, k, v, ids, ids)
  assert_close(got, jax.jit(lambda q, k, v: output_and_grads(reference, q, k, v, d_out))(*qkv),
               1e-5)


def interval(tiles):
  """(lo, hi) int32 of the True entries of each row of bool [B, n, m] (0, -1 when none);
  asserts they are contiguous."""
  any_ = tiles.any(-1)
  lo = np.where(any_, np.argmax(tiles, -1), 0)
  hi = np.where(any_, tiles.shape[-1] - 1 - np.argmax(tiles[..., ::-1], -1), -1)
  assert (tiles.sum(-1) == hi - lo + 1).all()
  return jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)


def test_kernels_visit_exactly_the_planned_tiles(f32_case):
  """Given a plan that drops needed tiles and flags masked tiles as full, the forward and both
  backward kernels compute attention over exactly the plan's pairs: a kernel that visited tiles
  outside the ranges, skipped one inside, or masked a tile flagged full would not match."""
  ids, qkv, d_out, run = f32_case
  base = plan(ids)
  n = L // BLOCK
  i, j = np.arange(n)[:, None], np.arange(n)[None, :]
  in_range = (j >= np.asarray(base.fwd_lo)[..., None]) & (j <= np.asarray(base.fwd_hi)[..., None])
  tiles = in_range & (j >= i - 3) & (j <= i - 1)  # a band below the diagonal: some rows see nothing
  full = tiles & (np.random.default_rng(5).random(tiles.shape) < 0.5)
  lo, hi = interval(tiles)
  q_lo, q_hi = interval(tiles.swapaxes(1, 2))
  flags = jnp.asarray(full, jnp.int32)
  tables = base._replace(fwd_lo=lo, fwd_hi=hi, fwd_full=flags, dq_lo=lo, dq_hi=hi, dq_full=flags,
                         dkv_lo=q_lo, dkv_hi=q_hi, dkv_full=jnp.swapaxes(flags, 1, 2))
  expand = lambda t: np.repeat(np.repeat(t, BLOCK, axis=1), BLOCK, axis=2)
  mask = np.asarray(jax.jit(M.attention_mask)(ids, ids))
  allowed = expand(tiles) & (expand(full) | mask)
  assert (mask & ~allowed).any() and (allowed & ~mask).any() and not allowed.any(-1).all()
  want = jax.jit(lambda q, k, v: output_and_grads(
      lambda q, k, v: dense_attention(q, k, v, jnp.asarray(allowed)), q, k, v, d_out))(*qkv)
  assert_close(run(tables, *qkv), want, 1e-5)


def test_bfloat16_mha_padded_head_dim_matches_reference():
  """The public entry in bfloat16: one kv head per query head, head dim 48 (padded to 64),
  unequal forward and backward blocks."""
  heads, head_dim = 2, 48
  ids = unified_ids()
  q, k, v = (normal(s, (B, L, heads, head_dim), jnp.bfloat16) for s in (6, 7, 8))
  d_out = normal(9, (B, L, heads, head_dim), jnp.bfloat16)
  flash = lambda q, k, v: flash_gpu.flash_attention(
      q, k, v, ids, block_q=64, block_k=32, block_outer_bwd=64, block_inner_bwd=32,
      interpret=True)
  got = jax.jit(lambda q, k, v: output_and_grads(flash, q, k, v, d_out))(q, k, v)
  assert got[0].dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in got[1])
  reference = lambda q, k, v: M.reference_attention(q, k, v, ids, ids)
  f32 = lambda x: x.astype(jnp.float32)
  assert_close(got, jax.jit(lambda q, k, v: output_and_grads(reference, q, k, v, f32(d_out)))(
      f32(q), f32(k), f32(v)), 2e-2)


def test_lowers_for_cuda_without_length_squared_tensors():
  """value_and_grad through the Triton kernels lowers for CUDA on this CPU host, and no tensor
  in it has two dims of the row length (384), while the dense reference path has them."""
  length = 384
  sd = jax.ShapeDtypeStruct
  ids = M.MaskIds(*[sd((1, length), jnp.int32)] * 4)
  q, kv = sd((1, length, 4, 64), jnp.bfloat16), sd((1, length, 2, 64), jnp.bfloat16)

  def lowered(attention):
    loss = lambda q, k, v, ids: jnp.sum(attention(q, k, v, ids).astype(jnp.float32))
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv, ids).lower(
        lowering_platforms=("cuda",)).as_text()

  square = re.compile(rf"tensor<(\d+x)*{length}x(\d+x)*{length}x")
  flash = lowered(flash_gpu.flash_attention)
  for kernel in ("fwd", "delta", "dq", "dkv"):
    assert f'name = "unified_flash_{kernel}"' in flash
  assert not square.search(flash)
  assert square.search(lowered(lambda q, k, v, ids: M.reference_attention(q, k, v, ids, ids)))


def test_rejects_lengths_the_blocks_do_not_divide():
  with pytest.raises(ValueError, match="sequence length 192"):
    flash_gpu.make_config(192, 64)
