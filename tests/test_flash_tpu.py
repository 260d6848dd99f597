"""The TPU flash kernel (`unimm.kernels.flash_tpu`): values and gradients against the dense
reference in Pallas interpret mode on CPU, and an ahead-of-time compile for a v5p topology
(the Mosaic lowering, and no [L, L] buffer anywhere in the program)."""

import concurrent.futures
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_unified_ids
from unimm.batch import CLEAN_IMAGE, NOISED_IMAGE
from unimm.kernels import flash_tpu as F
from unimm.kernels import mask as M


def _one_document_row(length):
  """Ids of one row holding a single document: text with a clean image (positions 20-59)
  and a noised image (150-179). Its tile (1, 0) of 128-blocks is full (all causal, no
  noised key), (0, 1) lies outside the range, the diagonal tiles need their mask."""
  modality, image = np.zeros(length, np.int32), np.zeros(length, np.int32)
  modality[20:60], image[20:60] = CLEAN_IMAGE, 1
  modality[150:180], image[150:180] = NOISED_IMAGE, 2
  return M.MaskIds(np.ones(length, np.int32), modality, image, np.arange(length, dtype=np.int32))


def _ids(seed, batch, length):
  """Row 0: `_one_document_row`; the others random packed documents with padding, half of
  them bidirectional (every position 0)."""
  rand = random_unified_ids(seed, batch, length, max_doc=160, bidirectional=0.5)
  one = _one_document_row(length)
  return M.MaskIds(*(jnp.asarray(np.concatenate([o[None], r[1:]])) for o, r in zip(one, rand)))


def _inputs(seed, batch, length, heads, kv_heads, dim, dtype):
  """Standard normal q, k, v and output cotangent."""
  rng = np.random.default_rng(seed)
  shapes = [(batch, length, heads, dim), (batch, length, kv_heads, dim),
            (batch, length, kv_heads, dim), (batch, length, heads, dim)]
  return [jnp.asarray(rng.standard_normal(s, np.float32), dtype) for s in shapes]


def _value_and_grads(attend, q, k, v, do):
  out, vjp = jax.vjp(attend, q, k, v)
  return (out, *vjp(do))


def _rel_err(got, ref):
  got, ref = got.astype(jnp.float32), ref.astype(jnp.float32)
  return float(jnp.max(jnp.abs(got - ref)) / jnp.max(jnp.abs(ref)))


@pytest.mark.parametrize("dtype, heads, kv_heads, dim, tol", [
    (jnp.float32, 4, 2, 128, 1e-5),   # grouped-query heads, [B, L, H * D] layout
    (jnp.bfloat16, 2, 2, 64, 2e-2),   # [B, H, L, D] layout
])
def test_matches_reference(dtype, heads, kv_heads, dim, tol):
  """Output, dq, dk and dv match `mask.reference_attention` (in float32 on the same inputs)
  on packed rows with padding, full tiles, masked tiles and skipped tiles."""
  batch, length, block = 2, 256, 128
  ids = _ids(0, batch, length)
  t = jax.jit(F.tables, static_argnums=(1, 2))(ids, block, block)
  full = np.asarray(t.full).reshape(batch, 2, 2)
  assert full[0, 1, 0] and not full[0, 0, 0]  # the full path and the masked path both run
  assert np.asarray(t.kv_hi).reshape(batch, 2)[0, 0] == 0  # tile (0, 1) is skipped
  q, k, v, do = _inputs(1, batch, length, heads, kv_heads, dim, dtype)

  flash = jax.jit(lambda q, k, v, do: _value_and_grads(
      lambda q, k, v: F.flash_attention(q, k, v, ids, block_q=block, block_k=block, interpret=True),
      q, k, v, do))
  got = flash(q, k, v, do)
  f32 = lambda x: x.astype(jnp.float32)
  ref = jax.jit(lambda q, k, v, do: _value_and_grads(
      lambda q, k, v: M.reference_attention(q, k, v, ids, ids), q, k, v, do))(
          f32(q), f32(k), f32(v), f32(do))
  print(f"{jnp.dtype(dtype).name}: relative error out, dq, dk, dv:",
        ", ".join(f"{_rel_err(g, r):.1e}" for g, r in zip(got, ref)))
  for name, g, r, x in zip(("out", "dq", "dk", "dv"), got, ref, (q, q, k, v)):
    assert g.dtype == dtype and g.shape == x.shape, name
    assert _rel_err(g, r) < tol, (name, _rel_err(g, r))


def test_blocks():
  """Default blocks shrink to divisors of the length; bad blocks and shapes are refused."""
  assert F.block_sizes(4096) == (512, 1024)
  assert F.block_sizes(256) == (256, 256)
  assert F.block_sizes(1536) == (512, 768)
  assert F.block_sizes(1024, 256, 128) == (256, 128)
  with pytest.raises(ValueError, match="block_k a multiple of 128 dividing the sequence length"):
    F.block_sizes(512, 128, 384)
  with pytest.raises(ValueError, match="block_q"):
    F.block_sizes(192)
  ids = M.MaskIds(*[jnp.zeros((1, 256), jnp.int32)] * 4)
  q = jnp.zeros((1, 256, 3, 128))
  with pytest.raises(ValueError, match="H a multiple of KV"):
    F.flash_attention(q, jnp.zeros((1, 256, 2, 128)), jnp.zeros((1, 256, 2, 128)), ids)


_LIBTPU = os.environ.get("TPU_LIBRARY_PATH", "")


@pytest.mark.skipif(not os.path.exists(_LIBTPU),
                    reason="libtpu.so is not installed beside the venv (make test installs it)")
def test_compiles_for_tpu_without_dense_mask():
  """value_and_grad of a loss through the kernel, at the default blocks, compiles ahead of time
  for a v5p:2x2x1 topology (batch-sharded over its 4 chips: the dispatch runs it per shard), and no
  buffer of the program is [L, L]-sized: temporaries stay far below one [H, L, L] score tensor,
  and no shape has two L-long dims. The same program over `mask.reference_attention` fails
  both checks."""
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

  from unimm.config import DEFAULT_RULES
  from unimm.kernels.attention import attention
  from unimm.parallel import sharding as shd

  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  mesh = Mesh(np.asarray(topo.devices).reshape(4, 1, 1, 1), shd.MESH_AXES)
  batch, length, heads, kv_heads, dim = 4, 4096, 8, 2, 128
  rows = NamedSharding(mesh, P(("data", "fsdp", "expert")))
  arg = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=rows)
  kv = arg((batch, length, kv_heads, dim), jnp.bfloat16)
  args = (arg((batch, length, heads, dim), jnp.bfloat16), kv, kv,
          M.MaskIds(*[arg((batch, length), jnp.int32)] * 4))
  scores = heads * length * length * 2  # one chip's [H, L, L] bfloat16 scores (its batch is 1)

  def lower(attend):
    loss = lambda q, k, v, ids: jnp.sum(attend(q, k, v, ids).astype(jnp.float32) ** 2)
    with shd.use_mesh_rules(mesh, DEFAULT_RULES):
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args)

  def compile_(lowered):
    start = time.perf_counter()
    compiled = lowered.compile()
    text = compiled.as_text()
    shapes = re.findall(r"\[([\d,]+)\]", text)
    dense = [s for s in shapes if s.split(",").count(str(length)) >= 2]
    return compiled.memory_analysis().temp_size_in_bytes, dense, text, time.perf_counter() - start

  lowered = [lower(lambda q, k, v, ids: attention(q, k, v, ids, ids, "flash")),
             lower(lambda q, k, v, ids: M.reference_attention(q, k, v, ids, ids))]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:  # XLA compiles on one core each
    (temp, dense, text, seconds), (ref_temp, ref_dense, _, ref_seconds) = pool.map(
        compile_, lowered)
  print(f"flash: {temp / 2**20:.1f} MiB temporaries, compiled in {seconds:.1f} s; "
        f"reference: {ref_temp / 2**20:.1f} MiB, {ref_seconds:.1f} s")
  assert all(f"flash_tpu_{k}" in text for k in ("fwd", "dq", "dkv"))  # the Mosaic kernels
  assert not dense, dense[:3]
  assert temp < scores / 4
  assert ref_dense and ref_temp > scores
