"""Which attention kernel runs, per backend (`model.attention`).

  xla    the dense mask built from ids, float32 scores (`mask.reference_attention`); any shape
  flash  a Pallas flash kernel that builds each mask tile from the packed ids and visits only
         the tiles the mask can reach (`flash_gpu`: Triton on GPU; `flash_tpu`: Mosaic on TPU;
         on CPU the GPU kernel in Pallas interpret mode, slow, for tests)
  cudnn  GPU: cuDNN flash attention (`jax.nn.dot_product_attention`; bf16 / fp16, head dim a
         multiple of 8 up to 128) for batches of text-only rows of one causal document each
         (plus trailing padding), the flash kernel otherwise (decided per batch by a
         `lax.cond`); elsewhere as flash
  auto   GPU: cudnn, TPU: flash, CPU: xla

The kernel paths need self-attention over whole rows (queries and keys with the same ids)
and a length that divides into their blocks; anything else (the KV-cached decoding of the
sampler, odd lengths) takes the XLA path. The platform is that of the devices the program is
traced for (`unimm.parallel.sharding.platform`), or the one `target_platform` names.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from unimm.batch import TEXT
from unimm.errors import UserError
from unimm.kernels import mask as M
from unimm.parallel import sharding as shd

IMPLS = ("auto", "xla", "flash", "cudnn")
MIN_BLOCK = 128  # rows the kernels take are a multiple of this (the TPU lane width); others: XLA


def _flash_gpu(q, k, v, ids, interpret=False):
  from unimm.kernels import flash_gpu
  return flash_gpu.flash_attention(q, k, v, ids, interpret=interpret)


def _flash_tpu(q, k, v, ids):
  from unimm.kernels import flash_tpu
  return flash_tpu.flash_attention(q, k, v, ids)


def cudnn_available():
  """Whether this JAX can call cuDNN attention (a CUDA jaxlib with cuDNN); without it the GPU
  branch is the flash kernel alone (e.g. when a CPU host lowers a program for GPU)."""
  try:
    from jax._src.cudnn import fused_attention_stablehlo
    fused_attention_stablehlo.check_cudnn_version()
    return True
  except Exception:  # pylint: disable=broad-except
    return False


def _causal_rows(ids: M.MaskIds):
  """(bool scalar, lengths [B]): every row is text only, one document (segment 1) from index 0
  with positions 0.. and then padding (segment 0), as cuDNN's causal mask with sequence
  lengths assumes."""
  length = jnp.sum(ids.segment > 0, axis=1).astype(jnp.int32)
  idx = jnp.arange(ids.segment.shape[1], dtype=jnp.int32)[None]
  inside = idx < length[:, None]
  ok = (jnp.all(ids.modality == TEXT) & jnp.all(jnp.where(inside, ids.segment == 1, ids.segment == 0))
        & jnp.all(jnp.where(inside, ids.position == idx, True)))
  return ok, length


def _cudnn_or_flash(q, k, v, ids):
  ok, length = _causal_rows(ids)

  def cudnn(q, k, v, length):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, query_seq_lengths=length,
                                        key_value_seq_lengths=length, implementation="cudnn")

  def flash(q, k, v, length):
    del length
    return _flash_gpu(q, k, v, ids)

  return jax.lax.cond(ok, cudnn, flash, q, k, v, length)


def uses_kernel(impl, q_ids, kv_ids, length):
  """Whether `impl` can run a kernel here (else the XLA path)."""
  return impl != "xla" and q_ids is kv_ids and length % MIN_BLOCK == 0


def attention(q, k, v, q_ids: M.MaskIds, kv_ids: M.MaskIds, impl="auto"):
  """Masked attention. q [B, Lq, H, D], k / v [B, Lk, KV, D] (grouped-query heads when
  KV < H) -> [B, Lq, H, D] in q's dtype, scale 1/sqrt(D)."""
  if impl not in IMPLS:
    raise ValueError(f"attention kernel '{impl}' is unknown: use one of {', '.join(IMPLS)}")
  where = shd.platform()
  if impl == "auto" and where not in ("gpu", "tpu"):
    impl = "xla"
  if not uses_kernel(impl, q_ids, kv_ids, q.shape[1]):
    return M.reference_attention(q, k, v, q_ids, kv_ids)
  if where == "tpu":
    kernel = _flash_tpu
  elif where == "gpu":
    cudnn = (impl in ("auto", "cudnn") and q.dtype in (jnp.bfloat16, jnp.float16)
             and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and cudnn_available())
    kernel = _cudnn_or_flash if cudnn else _flash_gpu
  else:
    kernel = functools.partial(_flash_gpu, interpret=True)
  return _per_shard(kernel, q, k, v, q_ids)


def _per_shard(kernel, q, k, v, ids):
  """`kernel` on each device's shard of the batch and heads (`jax.shard_map` over the active
  mesh): XLA cannot partition a kernel's custom call (Mosaic refuses; a Triton call would be
  gathered whole onto every device). The batch is split as the rule "batch" says and heads as
  "act_heads", each where it divides (heads: when query and key/value heads both do), else
  replicated; rows stay whole."""
  mesh, rules = shd._context["mesh"], shd._context["rules"]  # pylint: disable=protected-access
  if mesh is None or mesh.size == 1:
    return kernel(q, k, v, ids)
  batch, length, heads, _ = shd.logical_to_spec(("batch", "length", "act_heads", None), rules)
  if length is not None:
    raise UserError("the flash attention kernels need whole rows on each device: map the logical "
                    "axis 'length' to no mesh axis in mesh.rules, or use model.attention='xla'")
  size = lambda e: math.prod(mesh.shape[a] for a in ((e,) if isinstance(e, str) else e or ()))
  batch = batch if q.shape[0] % size(batch) == 0 else None
  heads = heads if q.shape[2] % size(heads) == 0 and k.shape[2] % size(heads) == 0 else None
  spec, row = P(batch, None, heads, None), P(batch, None)
  local = lambda q, k, v, *ids: kernel(q, k, v, M.MaskIds(*ids))
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec) + (row,) * 4, out_specs=spec,
                       check_vma=False)(q, k, v, *ids)
