"""The attention dispatch (model.attention): the kernel each platform gets, the kernels under a
sharded mesh, and a lowered train step with no [L, L] buffer."""

import re

import jax
import jax.numpy as jnp
import pytest

from tests.helpers import random_unified_ids
from tests.test_sharding import tiny_config
from unimm.kernels import attention as ka
from unimm.kernels import mask as M
from unimm.parallel import sharding as shd
from unimm.train.step import Trainer


def _inputs(seed, b=2, length=128, heads=4, kv_heads=2, d=16):
  ids = M.MaskIds(*map(jnp.asarray, random_unified_ids(seed, b, length)))
  r = jax.random.split(jax.random.key(seed), 3)
  q = jax.random.normal(r[0], (b, length, heads, d), jnp.float32)
  k, v = (jax.random.normal(x, (b, length, kv_heads, d), jnp.float32) for x in r[1:])
  return q, k, v, ids


def _primitives(fn, *args):
  """The program's jaxpr as text (sub-jaxprs of custom VJPs, shard_maps, ... included)."""
  return str(jax.make_jaxpr(fn)(*args))


@pytest.mark.parametrize("platform,impl,kernel", [
    ("cpu", "auto", False), ("cpu", "xla", False), ("cpu", "flash", True),
    ("gpu", "auto", True), ("gpu", "xla", False), ("tpu", "flash", True)])
def test_each_platform_gets_its_kernel(platform, impl, kernel):
  q, k, v, ids = _inputs(0)
  with shd.target_platform(platform):
    prims = _primitives(lambda q, k, v: ka.attention(q, k, v, ids, ids, impl), q, k, v)
  assert ("pallas_call" in prims) == kernel
  # other ids than the queries' (a KV cache), or a length off the blocks: the XLA path
  with shd.target_platform(platform):
    other = M.MaskIds(*ids)
    assert "pallas_call" not in _primitives(lambda q, k, v: ka.attention(q, k, v, ids, other, impl), q, k, v)
    short = M.MaskIds(*(x[:, :96] for x in ids))
    assert "pallas_call" not in _primitives(
        lambda q, k, v: ka.attention(q, k, v, short, short, impl), q[:, :96], k[:, :96], v[:, :96])


def test_flash_on_a_sharded_mesh_matches_the_reference():
  """The kernel runs per device on its batch and head shard (shard_map): same values and
  gradients as the dense reference on one device."""
  q, k, v, ids = _inputs(1)
  mesh = shd.make_mesh(dict(data=2, fsdp=1, tensor=2, expert=1), jax.devices()[:4])
  rules = tiny_config().mesh.rules
  loss = lambda f: lambda q, k, v: jnp.sum(jnp.sin(f(q, k, v)))

  def flash(q, k, v):
    with shd.use_mesh_rules(mesh, rules):
      return ka.attention(q, k, v, ids, ids, "flash")

  got = jax.jit(jax.value_and_grad(loss(flash), argnums=(0, 1, 2)))(q, k, v)
  want = jax.value_and_grad(loss(lambda q, k, v: M.reference_attention(q, k, v, ids, ids)),
                            argnums=(0, 1, 2))(q, k, v)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert float(jnp.max(jnp.abs(g - w)) / jnp.max(jnp.abs(w))) < 1e-5


def _has_square(text, length):
  return re.search(rf"tensor<(\d+x)*{length}x{length}x", text) is not None


def test_train_step_lowered_for_gpu_holds_no_length_squared_buffer(vocab_size=384):
  """The whole bf16 train step with the flash kernel, lowered for CUDA on this host: no
  [.., L, L] tensor anywhere (the XLA path's [B, H, L, L] scores and [B, L, L] mask are)."""
  length = 640  # a multiple of the kernel blocks, unlike any other dimension of the step
  texts = {}
  for impl in ("flash", "xla"):
    c = tiny_config(data=1)
    c.data.seq_len, c.data.batch_size = length, 2
    c.model.update(attention=impl, dtype="bfloat16", scan=True, remat="full", ce_chunk=128)
    trainer = Trainer(c, shd.make_mesh(c.mesh, jax.devices()[:1]), vocab_size)
    with shd.target_platform("gpu"):
      texts[impl] = trainer.train_step.trace(trainer.abstract_state, *trainer.abstract_inputs()
                                             ).lower(lowering_platforms=("cuda",)).as_text()
  assert "triton" in texts["flash"].lower()
  assert not _has_square(texts["flash"], length)
  assert _has_square(texts["xla"], length)  # the check sees the buffers it looks for


@pytest.mark.parametrize("remat,forward_kernels", [("none", 1), ("full", 2), ("save_dots", 1),
                                                    ("offload", 1)])
def test_remat_policies_keep_the_kernel_forward(remat, forward_kernels):
  """Under every policy but "full" the backward reuses the flash forward's output and
  logsumexp instead of running the forward kernel again."""
  from unimm.models.layers import REMAT
  q, k, v, ids = _inputs(2)
  f = lambda q, k, v: jnp.sum(ka.attention(q, k, v, ids, ids, "flash"))
  f = f if REMAT[remat] is None else jax.checkpoint(f, policy=REMAT[remat])
  text = _primitives(jax.grad(f, argnums=(0, 1, 2)), q, k, v)
  assert text.count("pallas_call") == forward_kernels + 3  # + delta, dq, dk / dv
