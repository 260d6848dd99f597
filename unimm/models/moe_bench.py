"""Grouped-matmul kernels of the MoE layer, timed against peers in the same run.

    python -m unimm.models.moe_bench [--tokens N] [--width D] [--expert_dim F] [--experts E]
                                     [--top_k K] [--dtype bfloat16|float32] [--iters 10]

One grouped matmul of a routed layer ([T*k, D] rows in E groups times [E, D, F]) by each
kernel of `model.moe.impl` that runs here ("ragged": jax.lax.ragged_dot; "einsum": the
same rows as one batched einsum over equal groups, what the capacity path computes;
"tokamax": tokamax.ragged_dot when installed; "megablox": the Pallas TPU gmm, on TPU),
forward and forward+backward, and the peer every kernel is compared with: one plain
[T*k, D] x [D, F] matmul of the same FLOPs. Then the whole MoE layer (routing, dispatch,
three matmuls, combine) per impl against a dense SwiGLU of the same active width. Prints one
JSON line per measurement (TFLOP/s, ms, ratio to the peer; "auto": the impl that
model.moe.impl="auto" picks here). Defaults: the issue's H100 shape (8192 tokens, D 2048,
F 768, 32 experts, top-4) on accelerators, a quarter of each side on CPU.
"""

import argparse
import json

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from unimm.bench import mean_call_time
from unimm.models import moe
from unimm.models.layers import SwiGLU
from unimm.models.moe import MoE
from unimm.parallel import sharding as shd


def _kernels():
  """The dropless grouped matmuls that run here, by impl name."""
  names = ["ragged"]
  if moe.installed_tokamax() is not None:
    names.append("tokamax")
  if shd.platform() == "tpu":
    names.append("megablox")
  return {name: moe.grouped_matmul(name) for name in names}


def main(argv=None):
  cpu = jax.default_backend() == "cpu"
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--tokens", type=int, default=2048 if cpu else 8192)
  p.add_argument("--width", type=int, default=512 if cpu else 2048)
  p.add_argument("--expert_dim", type=int, default=192 if cpu else 768)
  p.add_argument("--experts", type=int, default=32)
  p.add_argument("--top_k", type=int, default=4)
  p.add_argument("--dtype", default="float32" if cpu else "bfloat16")
  p.add_argument("--iters", type=int, default=5 if cpu else 20)
  a = p.parse_args(argv)
  dt = jnp.dtype(a.dtype)
  rows, d, f, e = a.tokens * a.top_k, a.width, a.expert_dim, a.experts
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(k1, (rows, d), dt)
  w = (jax.random.normal(k2, (e, d, f), jnp.float32) / d ** 0.5).astype(dt)
  groups = jnp.full((e,), rows // e, jnp.int32)
  flops = 2 * rows * d * f
  base = dict(device=jax.devices()[0].device_kind, tokens=a.tokens, width=d, expert_dim=f,
              experts=e, top_k=a.top_k, dtype=a.dtype, auto=moe.resolve_impl("auto"))

  def report(name, fwd_s, both_s, peer):
    line = dict(base, kernel=name, fwd_ms=round(fwd_s * 1e3, 3), fwd_bwd_ms=round(both_s * 1e3, 3),
                fwd_tflops=round(flops / fwd_s / 1e12, 3),
                fwd_bwd_tflops=round(3 * flops / both_s / 1e12, 3))
    if peer:
      line.update(fwd_vs_peer=round(peer[0] / fwd_s, 3), fwd_bwd_vs_peer=round(peer[1] / both_s, 3))
    print(json.dumps(line), flush=True)
    return fwd_s, both_s

  def measure(f_apply):
    fwd = jax.jit(f_apply)
    both = jax.jit(jax.grad(lambda x, w: jnp.sum(f_apply(x, w).astype(jnp.float32)), (0, 1)))
    return mean_call_time(fwd, x, w, iters=a.iters), mean_call_time(both, x, w, iters=a.iters)

  peer = report("peer: plain matmul", *measure(lambda x, w: x @ w[0]), None)
  for name, kernel in _kernels().items():
    report(name, *measure(lambda x, w, kernel=kernel: kernel(x, w, groups)), peer)
  report("einsum", *measure(
      lambda x, w: jnp.einsum("egd,edf->egf", x.reshape(e, rows // e, d), w)), peer)

  # the whole layer against a dense SwiGLU of the same active width (top_k * F)
  xs = jax.random.normal(k3, (a.tokens // 8, 8, d), dt)
  dense = SwiGLU(d, a.top_k * f, 1, rngs=nnx.Rngs(0))

  def layer_time(model):
    graph, params = nnx.split(model)
    params = jax.tree.map(lambda v: v.astype(dt), params)

    def loss(params, x):
      y = nnx.merge(graph, params)(x)
      y = y[0] if isinstance(y, tuple) else y
      return jnp.sum(y.astype(jnp.float32))

    return (mean_call_time(jax.jit(lambda p, x: nnx.merge(graph, p)(x)), params, xs, iters=a.iters),
            mean_call_time(jax.jit(jax.grad(loss)), params, xs, iters=a.iters))

  flops = 3 * 2 * a.tokens * d * a.top_k * f  # the layer's matmuls (routing not counted)
  peer = report("layer peer: dense SwiGLU", *layer_time(dense), None)
  for impl in [*_kernels(), "einsum"]:
    cfg = ml_collections.ConfigDict(dict(experts=e, top_k=a.top_k, expert_dim=f, shared_experts=0,
                                         router="softmax", renormalize=True, impl=impl,
                                         capacity_factor=1.0 if impl == "einsum" else 0.0))
    report(f"layer {impl}", *layer_time(MoE(d, cfg, f, 1, rngs=nnx.Rngs(0))), peer)


if __name__ == "__main__":
  main()
