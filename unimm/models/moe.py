"""Routed mixture-of-experts feed-forward (Qwen3-MoE, HunyuanImage 3.0), with expert parallelism.

`MoE(width, moe_cfg, mlp_dim, depth, rngs=...)(x)` maps x [B, L, D] to (y [B, L, D], aux).

Routing (float32): logits = x @ router [D, E]. Router "softmax": probs = softmax(logits),
scores = probs; "sigmoid": scores = sigmoid(logits), probs = scores / sum(scores). The top_k
scores pick the experts and are the combine weights, divided by their sum when
`renormalize`. y = sum_k w_k SwiGLU_{e_k}(x) (+ the shared SwiGLU when shared_experts > 0),
with SwiGLU_e(x) = (silu(x @ w_gate[e]) * (x @ w_up[e])) @ w_down[e]. With the softmax router,
renormalize=True and no shared expert this is Hugging Face's Qwen3MoeSparseMoeBlock.

Grouped matmul (`moe_cfg.impl`):
  "ragged"   the T*k (token, expert) assignments sorted by expert, `jax.lax.ragged_dot`; dropless.
  "tokamax"  the same with `tokamax.ragged_dot` (optional extra, GPU: Mosaic GPU / Triton kernels).
  "megablox" the same with the Pallas TPU grouped matmul `megablox.gmm` (its custom VJP runs gmm
             and tgmm); tiles of `megablox_tiling`, rows padded to a whole number of row tiles;
             experts whose two dims admit no TPU tile run `jax.lax.ragged_dot` (said once on
             stderr). Off TPU the kernel runs in Pallas interpret mode (slow; for tests); on GPU
             it is an error.
  "einsum"   capacity-padded: C = ceil(capacity_factor * T * k / E) slots per expert (0: C = T,
             dropless). Slots are filled in priority order: every token's first choice (in token
             order), then every token's second choice, ...; assignments past slot C are dropped
             (they add nothing to y) and counted in aux["dropped"].
  "auto"     by the platform the program is traced for (`unimm.parallel.sharding.platform`): TPU
             megablox, GPU tokamax when installed (else ragged, said once on stderr), CPU ragged.
The kernels (tokamax, megablox) leave rows past sum(group_sizes) unwritten (NaN in interpret
mode); those rows, and their gradients, are zeroed around every kernel call.

Expert parallelism: with an active mesh (`unimm.parallel.sharding.use_mesh_rules`, more than
one device) routing and experts run in `jax.shard_map` over the whole mesh. Tokens keep the
sharding of the logical axes ("batch", "length") (by default the batch over data, fsdp and
expert); experts are split over the mesh axes of the logical axis "exp" (by default "expert")
and each expert's hidden dim over those of "mlp" (by default "tensor"). Each device routes its
own tokens (A = T_loc * k assignments, sorted by expert), then
  dropless impls on GPU / TPU: `jax.lax.ragged_all_to_all` sends each shard only the rows
          routed to its experts. Offsets and sizes come from an all_gather of every shard's
          per-expert counts ([ep, E] int32; C[i, j] rows go from shard i to shard j): i's rows
          for j start at sum_{j'<j} C[i, j'] in its buffer and land at sum_{i'<i} C[i', j] on
          j. The receive buffer holds the dropless worst case, ep * T_loc * min(k, E_loc) rows;
          the receiver sorts its rows by local expert (known from the gathered counts; the
          unused tail sorts last), runs the grouped matmul over its E_loc experts, and the
          reverse ragged_all_to_all (offsets swapped) brings the results home.
  dropless impls on CPU (XLA:CPU has no ragged all-to-all): `jax.lax.all_to_all` over
          fixed-size buffers of A rows per destination (the dropless worst case), each row
          carrying its local expert id (padding rows carry E_loc and sort last). The receiving
          shard sorts rows by local expert and runs the grouped matmul over its E_loc experts
          (rows past sum(group_sizes) are zero and never read back); a reverse all_to_all
          brings the results home.
  einsum:  builds its [E, C, D] slot buffer from its own tokens (capacity is per token shard:
          C = ceil(capacity_factor * T_loc * k / E)), all_to_all's the expert dim, runs the
          batched einsum over [E_loc, ep * C, D] and sends results back.
The down projection over a sharded hidden dim gives partial sums, added with `psum` over the
"mlp" mesh axes. The shared expert is a dense SwiGLU outside the shard_map (GSPMD).

aux (float32 scalars, statistics of the whole global batch, psum'ed over the token shards):
  lb_loss      Switch / GShard load balancing: E * sum_e load_e * P_e, P_e the mean over tokens of
               the router probability of e (sigmoid: scores normalised to sum 1 per token)
  z_loss       mean over tokens of logsumexp(logits)^2
  load         [E] share of the T*k assignments routed to each expert (before drops; sums to 1)
  dropped      assignments dropped for capacity (0 on dropless paths)
  assignments  T * k
  entropy      mean over tokens of the entropy of the router probabilities
Padding: `MoE(...)(x, mask)` with mask [B, L] (True for real tokens; the blocks pass
segment_ids > 0) leaves padding out of everything: it is routed nowhere (no expert rows,
no capacity slots, not counted as dropped), its output is 0 (plus the shared expert), and
the statistics above are over real tokens only. Without a mask every token is real.
"""

import math
import sys

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental.pallas.ops.tpu.megablox import gmm as megablox_gmm
from jax.sharding import PartitionSpec as P

from unimm.errors import UserError
from unimm.models import layers
from unimm.parallel import sharding as shd

ROUTERS = ("softmax", "sigmoid")
IMPLS = ("auto", "ragged", "einsum", "tokamax", "megablox")
MEGABLOX_ROWS = 512  # the largest megablox row tile
_said = set()


def _say_once(message):
  """Prints `message` on stderr the first time it comes up in this process."""
  if message not in _said:
    _said.add(message)
    print(message, file=sys.stderr, flush=True)


def _active_mesh():
  """(mesh, rules) of the enclosing `use_mesh_rules` when it spans more than one device, else None."""
  mesh, rules = shd._context["mesh"], shd._context["rules"]
  if mesh is None or mesh.size == 1:
    return None
  return mesh, rules


def _names(entry):
  """Mesh axis names of one PartitionSpec entry."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def _axis_arg(names):
  return names[0] if len(names) == 1 else tuple(names)


def installed_tokamax():
  """The tokamax module, or None when it is not installed."""
  try:
    import tokamax
    from absl import flags
  except ImportError:
    return None
  if not flags.FLAGS.is_parsed():  # tokamax's options are absl flags, parsed from sys.argv (and
    flags.FLAGS.mark_as_parsed()  # failing on unimm's flags) unless parsed: their defaults, then
  return tokamax


def resolve_impl(impl):
  """The grouped matmul `model.moe.impl` runs as on the platform being traced for."""
  where = shd.platform()
  if impl == "auto":
    if where == "tpu":
      return "megablox"
    if where == "gpu":
      if installed_tokamax() is not None:
        return "tokamax"
      _say_once("model.moe.impl='auto': tokamax is not installed, so the GPU grouped matmul is "
                "jax.lax.ragged_dot (pip install 'unimm[tokamax]' for its kernels)")
    return "ragged"
  if impl == "tokamax" and installed_tokamax() is None:
    raise UserError(
        "model.moe.impl='tokamax' needs the tokamax package (pip install 'unimm[tokamax]', "
        "jax >= 0.11.1, GPU); use 'ragged' or 'einsum'")
  if impl == "megablox" and where == "gpu":
    raise UserError("model.moe.impl='megablox' is the TPU kernel: on GPU use 'tokamax', 'ragged' "
                    "or 'auto'")
  return impl


def megablox_tiling(m, k, n, dtype):
  """(tm, tk, tn) of megablox.gmm for rows [m, k] times experts [G, k, n], or None when k and n
  admit no TPU tile. tk and tn tile the last (lane) dim of blocks of k and of n, in the forward
  and in the backward (whose gmm swaps k and n), so each is the largest of 512 / 256 / 128
  dividing both, or k itself when k == n; tm is at most MEGABLOX_ROWS, a whole number of
  sublanes (32-bit rows of 8), and the rows are padded to a multiple of it."""
  if k % 128 == 0 and n % 128 == 0:
    t = next(t for t in (512, 256, 128) if k % t == 0 and n % t == 0)
  elif k == n:
    t = k
  else:
    return None
  sub = 8 * max(1, 4 // jnp.dtype(dtype).itemsize)
  return min(MEGABLOX_ROWS, -(-m // sub) * sub), t, t


def _megablox(lhs, rhs, group_sizes):
  """megablox.gmm (Mosaic on TPU, interpret mode elsewhere) with jax.lax.ragged_dot's signature."""
  (m, k), n = lhs.shape, rhs.shape[2]
  tiling = megablox_tiling(m, k, n, lhs.dtype)
  if tiling is None:
    _say_once(f"megablox: experts of [{k}, {n}] admit no TPU tile (multiples of 128, or square), "
              "so jax.lax.ragged_dot runs them")
    return jax.lax.ragged_dot(lhs, rhs, group_sizes)
  pad = -m % tiling[0]
  out = megablox_gmm(jnp.pad(lhs, ((0, pad), (0, 0))) if pad else lhs, rhs, group_sizes,
                     preferred_element_type=lhs.dtype, tiling=tiling,
                     interpret=shd.platform() != "tpu")
  return out[:m] if pad else out


def grouped_matmul(impl):
  """The grouped matmul of a resolved dropless impl: (lhs [m, k], rhs [G, k, n], group_sizes [G]
  int32) -> [m, n]; rows past sum(group_sizes) are zero with "ragged", unspecified otherwise."""
  if impl == "tokamax":
    return installed_tokamax().ragged_dot
  if impl == "megablox":
    return _megablox
  return jax.lax.ragged_dot


def _route(x, valid, router, top_k, kind, renormalize):
  """x [T, D], valid [T] bool -> top-k weights [T, k] f32, experts [T, k] int32 (E for padding
  tokens: routed nowhere) and per-shard statistic sums over the valid tokens."""
  logits = x.astype(jnp.float32) @ router.astype(jnp.float32)  # [T, E]
  if kind == "softmax":
    probs = jax.nn.softmax(logits, axis=-1)
    scores = probs
  else:
    scores = jax.nn.sigmoid(logits)
    probs = scores / jnp.sum(scores, axis=-1, keepdims=True)
  weights, experts = jax.lax.top_k(scores, top_k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  num_experts = logits.shape[-1]
  experts = jnp.where(valid[:, None], experts, num_experts)  # one_hot(E) is all zeros
  v = valid.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  stats = {
      "counts": jnp.sum(jax.nn.one_hot(experts, num_experts, dtype=jnp.float32), axis=(0, 1)),
      "prob_sum": jnp.sum(probs * v[:, None], axis=0),
      "z_sum": jnp.sum(lse * lse * v),
      "entropy_sum": -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-30)) * v[:, None]),
      "tokens": jnp.sum(v),
  }
  return weights, experts.astype(jnp.int32), stats


def _aux(stats, top_k, dropped):
  tokens = jnp.maximum(stats["tokens"], 1.0)
  load = stats["counts"] / (tokens * top_k)
  mean_prob = stats["prob_sum"] / tokens
  return {
      "lb_loss": load.shape[0] * jnp.sum(load * mean_prob),
      "z_loss": stats["z_sum"] / tokens,
      "load": load,
      "dropped": jnp.asarray(dropped, jnp.float32),
      "assignments": stats["tokens"] * top_k,
      "entropy": stats["entropy_sum"] / tokens,
  }


def _swiglu_grouped(xs, w_gate, w_up, w_down, group_sizes, impl):
  """Rows xs [m, D] grouped by expert -> [m, D]; rows past sum(group_sizes) come out zero."""
  matmul = grouped_matmul(impl)
  if impl != "ragged":  # zero the rows a kernel leaves unwritten, and their gradients
    keep = (jnp.arange(xs.shape[0]) < jnp.sum(group_sizes))[:, None]
    xs, kernel = jnp.where(keep, xs, 0), matmul

    def matmul(lhs, rhs, sizes):
      return jnp.where(keep, kernel(lhs, rhs, sizes), 0)
  gate = matmul(xs, w_gate, group_sizes)
  up = matmul(xs, w_up, group_sizes)
  return matmul(jax.nn.silu(gate) * up, w_down, group_sizes)


def _combine(out, weights, dtype):
  """out [T * k, D] in (token, k) order, weights [T, k] -> [T, D]."""
  t, k = weights.shape
  out = out.reshape(t, k, -1).astype(jnp.float32)
  return jnp.sum(out * weights[..., None], axis=1).astype(dtype)


def _dispatch_padded(xs, sorted_e, experts_fn, *, e_loc, ep, axis):
  """Expert-parallel experts over fixed-size all_to_all buffers: xs [A, D] sorted by expert
  (sorted_e [A], E for padding) -> their outputs [A, D] (0 for padding)."""
  a = xs.shape[0]
  dest, local_id = sorted_e // e_loc, sorted_e % e_loc  # padding: dest ep, sent nowhere
  start = jnp.cumsum(jnp.bincount(dest, length=ep)) - jnp.bincount(dest, length=ep)
  pos = jnp.arange(a) - start[jnp.minimum(dest, ep - 1)]  # row within its destination's buffer
  send_x = jnp.zeros((ep, a, xs.shape[-1]), xs.dtype).at[dest, pos].set(xs, mode="drop")
  send_id = jnp.full((ep, a), e_loc, jnp.int32).at[dest, pos].set(local_id, mode="drop")
  recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True).reshape(ep * a, -1)
  recv_id = jax.lax.all_to_all(send_id, axis, 0, 0, tiled=True).reshape(ep * a)
  r_order = jnp.argsort(recv_id, stable=True)  # padding (id e_loc) sorts last
  group_sizes = jnp.bincount(recv_id, length=e_loc).astype(jnp.int32)  # drops padding
  r_out = experts_fn(recv_x[r_order], group_sizes)
  r_out = jnp.zeros_like(r_out).at[r_order].set(r_out).reshape(ep, a, -1)
  back = jax.lax.all_to_all(r_out, axis, 0, 0, tiled=True)
  return back.at[dest, pos].get(mode="fill", fill_value=0)


def _dispatch_ragged(xs, sorted_e, experts_fn, *, e_loc, ep, axis, top_k):
  """Expert-parallel experts over jax.lax.ragged_all_to_all (GPU, TPU): xs [A, D] sorted by
  expert (sorted_e [A], E for padding) -> their outputs [A, D] (0 for padding)."""
  a, d = xs.shape
  counts = jnp.bincount(sorted_e, length=e_loc * ep).astype(jnp.int32)  # padding (E) not counted
  per_expert = jax.lax.all_gather(counts, axis).reshape(ep, ep, e_loc)  # [sender, receiver, expert]
  sizes = jnp.sum(per_expert, axis=-1)  # [i, j]: rows shard i sends shard j
  send_at = jnp.cumsum(sizes, axis=1) - sizes  # where i's rows for j start in i's xs
  recv_at = jnp.cumsum(sizes, axis=0) - sizes  # where i's rows land on j
  me = jax.lax.axis_index(axis)
  cap = ep * (a // top_k) * min(top_k, e_loc)  # dropless worst case
  # output buffers like xs, varying over the mesh: ragged_all_to_all's result takes their type
  recv = jax.lax.ragged_all_to_all(xs, jnp.zeros_like(xs, shape=(cap, d)), send_at[me], sizes[me],
                                   recv_at[me], sizes[:, me], axis_name=axis)
  # received rows: sender-major, then by local expert; the unused tail gets id e_loc
  mine = per_expert[:, me, :]  # [sender, local expert]: rows received
  ids = jnp.append(jnp.tile(jnp.arange(e_loc, dtype=jnp.int32), ep), e_loc)
  recv_id = jnp.repeat(ids, jnp.append(mine.reshape(-1), cap - jnp.sum(mine)),
                       total_repeat_length=cap)
  r_order = jnp.argsort(recv_id, stable=True)
  r_out = experts_fn(recv[r_order], jnp.sum(mine, axis=0))
  r_out = jnp.zeros_like(r_out).at[r_order].set(r_out)
  return jax.lax.ragged_all_to_all(r_out, jnp.zeros_like(r_out, shape=(a, r_out.shape[1])),
                                   recv_at[:, me], sizes[:, me], send_at[:, me], sizes[me],
                                   axis_name=axis)


def _experts_ragged(x, weights, experts, w_gate, w_up, w_down, *, num_experts, ep_axes, ep, impl):
  """Dropless routed experts: x [T, D] -> [T, D] (partial over a sharded hidden dim)."""
  t, k = experts.shape
  flat = experts.reshape(-1)  # [A], assignment a = token a // k, choice a % k
  order = jnp.argsort(flat, stable=True)
  sorted_e = flat[order]
  xs = x[order // k]  # [A, D] grouped by expert

  def experts_fn(rows, group_sizes):
    return _swiglu_grouped(rows, w_gate, w_up, w_down, group_sizes, impl)

  if ep == 1:  # padding (id E) sorts last, outside every group: its rows come out 0
    out_sorted = experts_fn(xs, jnp.bincount(flat, length=num_experts).astype(jnp.int32))
  else:
    kw = dict(e_loc=num_experts // ep, ep=ep, axis=_axis_arg(ep_axes))
    if shd.platform() in ("gpu", "tpu"):
      out_sorted = _dispatch_ragged(xs, sorted_e, experts_fn, top_k=k, **kw)
    else:
      out_sorted = _dispatch_padded(xs, sorted_e, experts_fn, **kw)
  out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
  return _combine(out, weights, x.dtype)


def _experts_einsum(x, weights, experts, w_gate, w_up, w_down, *, num_experts, ep_axes, ep,
                    capacity_factor):
  """Capacity-padded routed experts: x [T, D] -> ([T, D], dropped assignments)."""
  t, k = experts.shape
  d = x.shape[-1]
  cap = t if capacity_factor <= 0 else max(1, math.ceil(capacity_factor * t * k / num_experts))
  prio = experts.T.reshape(-1)  # [k * T]: every first choice in token order, then second, ...
  onehot = jax.nn.one_hot(prio, num_experts, dtype=jnp.int32)  # padding (id E): no slot
  pos = jnp.sum((jnp.cumsum(onehot, axis=0) - 1) * onehot, axis=-1)  # slot within its expert
  real = prio < num_experts
  kept = (pos < cap) & real
  slot = jnp.where(kept, pos, cap)  # cap is out of bounds: dropped by the scatter
  tok = jnp.tile(jnp.arange(t), k)
  buf = jnp.zeros((num_experts, cap, d), x.dtype).at[prio, slot].set(x[tok], mode="drop")
  if ep > 1:
    axis = _axis_arg(ep_axes)
    e_loc = num_experts // ep
    buf = jax.lax.all_to_all(buf.reshape(ep, e_loc, cap, d), axis, 0, 0, tiled=True)
    buf = buf.transpose(1, 0, 2, 3).reshape(e_loc, ep * cap, d)  # [E_loc, ep * C, D]
  h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", buf, w_gate)) * jnp.einsum("ecd,edf->ecf", buf, w_up)
  out = jnp.einsum("ecf,efd->ecd", h, w_down)
  if ep > 1:
    out = out.reshape(e_loc, ep, cap, d).transpose(1, 0, 2, 3)
    out = jax.lax.all_to_all(out, axis, 0, 0, tiled=True).reshape(num_experts, cap, d)
  got = out.at[prio, slot].get(mode="fill", fill_value=0)  # [k * T, D], zero when dropped
  got = got.reshape(k, t, d).transpose(1, 0, 2).reshape(t * k, d)
  return _combine(got, weights, x.dtype), jnp.sum(real & ~kept)


class MoE(nnx.Module):
  """Routed SwiGLU experts (+ optional shared expert); see the module docstring."""

  def __init__(self, width, moe_cfg, mlp_dim, depth, *, rngs):
    experts, top_k = int(moe_cfg.experts), int(moe_cfg.top_k)
    if top_k < 1:
      raise UserError(f"model.moe.top_k={top_k}: use top_k >= 1")
    if top_k > experts:
      raise UserError(f"model.moe.top_k={top_k} is larger than model.moe.experts={experts}: "
                      "use top_k <= experts")
    if moe_cfg.router not in ROUTERS:
      raise UserError(f"model.moe.router='{moe_cfg.router}' is unknown: use 'softmax' or 'sigmoid'")
    if moe_cfg.impl not in IMPLS:
      raise UserError(f"model.moe.impl='{moe_cfg.impl}' is unknown: use 'auto', 'ragged', "
                      "'einsum', 'tokamax' or 'megablox'")
    if float(moe_cfg.capacity_factor) < 0:
      raise UserError(f"model.moe.capacity_factor={moe_cfg.capacity_factor}: use 0 (dropless) or "
                      "a positive factor")
    f = int(moe_cfg.expert_dim) or int(mlp_dim)
    self.num_experts, self.top_k, self.expert_dim = experts, top_k, f
    self.router_kind, self.renormalize = str(moe_cfg.router), bool(moe_cfg.renormalize)
    self.impl, self.capacity_factor = str(moe_cfg.impl), float(moe_cfg.capacity_factor)
    std = 1.0 / math.sqrt(width)
    self.router = layers.param(rngs, (width, experts), ("embed", None), std)
    self.w_gate = layers.param(rngs, (experts, width, f), ("exp", "embed", "mlp"), std)
    self.w_up = layers.param(rngs, (experts, width, f), ("exp", "embed", "mlp"), std)
    self.w_down = layers.param(rngs, (experts, f, width), ("exp", "mlp", "embed"),
                               1.0 / math.sqrt(f) / math.sqrt(2 * depth))
    shared = int(moe_cfg.shared_experts)
    self.shared = layers.SwiGLU(width, shared * f, depth, rngs=rngs) if shared > 0 else None

  def _local(self, x, mask, router, w_gate, w_up, w_down, *, impl, ep_axes=(), ep=1,
             token_axes=(), mlp_axes=()):
    """x [B, L, D], mask [B, L] (this device's tokens) -> (y [B, L, D], aux); impl resolved."""
    b, l, d = x.shape
    xf = x.reshape(b * l, d)
    weights, experts, stats = _route(xf, mask.reshape(b * l), router, self.top_k,
                                     self.router_kind, self.renormalize)
    kw = dict(num_experts=self.num_experts, ep_axes=ep_axes, ep=ep)
    if impl == "einsum":
      y, dropped = _experts_einsum(xf, weights, experts, w_gate, w_up, w_down,
                                   capacity_factor=self.capacity_factor, **kw)
    else:
      y = _experts_ragged(xf, weights, experts, w_gate, w_up, w_down, impl=impl, **kw)
      dropped = jnp.zeros((), jnp.int32)
    if mlp_axes:  # the hidden dim is split: partial sums of the down projection
      y = jax.lax.psum(y, _axis_arg(mlp_axes))
    if token_axes:  # global statistics
      stats, dropped = jax.lax.psum((stats, dropped), _axis_arg(token_axes))
    return y.reshape(b, l, d), _aux(stats, self.top_k, dropped)

  def __call__(self, x, mask=None):
    """x [B, L, D], mask [B, L] bool (True: a real token; None: all) -> (y, aux)."""
    mask = jnp.ones(x.shape[:2], bool) if mask is None else mask.astype(bool)
    impl = resolve_impl(self.impl)  # the platform's kernel; a one-line error before any tracing
    params = (self.router.value, self.w_gate.value, self.w_up.value, self.w_down.value)
    active = _active_mesh()
    if active is None:
      y, aux = self._local(x, mask, *params, impl=impl)
    else:
      y, aux = self._sharded(x, mask, params, impl, *active)
    if self.shared is not None:
      y = y + self.shared(x)
    return y, aux

  def _sharded(self, x, mask, params, impl, mesh, rules):
    act = shd.logical_to_spec(("batch", "length", "act_embed"), rules)
    x_spec = P(act[0], act[1], None)  # tokens keep their sharding; D whole
    token_axes = _names(act[0]) + _names(act[1])
    w_in = shd.logical_to_spec(("exp", None, "mlp"), rules)
    w_out = shd.logical_to_spec(("exp", "mlp", None), rules)
    ep_axes, mlp_axes = _names(w_in[0]), _names(w_in[2])
    ep = math.prod(mesh.shape[a] for a in ep_axes)
    label = "/".join(f"mesh.{a}" for a in ep_axes)
    if self.num_experts % ep:
      raise UserError(
          f"model.moe.experts={self.num_experts} does not divide over {label}={ep}: "
          f"use a multiple of {ep} experts or another {label}")
    if ep > 1 and not set(ep_axes) <= set(token_axes):
      raise UserError(
          f"expert parallelism over {label} needs the tokens sharded over it too: add "
          f"{', '.join(ep_axes)} to the 'batch' rule of mesh.rules")
    if set(mlp_axes) & set(token_axes):
      raise UserError(
          f"mesh.rules shard both the MoE hidden dim ('mlp') and the tokens ('batch'/'length') "
          f"over {', '.join(sorted(set(mlp_axes) & set(token_axes)))}: map them to different mesh axes")
    for dim, entry, what in ((x.shape[0], act[0], "batch"), (x.shape[1], act[1], "length")):
      n = math.prod(mesh.shape[a] for a in _names(entry))
      if dim % n:
        raise UserError(f"MoE input {what} {dim} does not divide over mesh axes {entry} of size "
                        f"{n}: change data.batch_size / data.seq_len or the mesh")
    fn = jax.shard_map(
        lambda *a: self._local(*a, impl=impl, ep_axes=ep_axes, ep=ep, token_axes=token_axes,
                               mlp_axes=mlp_axes),
        mesh=mesh,
        in_specs=(x_spec, P(act[0], act[1]), P(), w_in, w_in, w_out),
        out_specs=(x_spec, P()),
        # the Pallas kernels declare no varying mesh axes on their outputs, which check_vma
        # rejects; unchecked, the backward gets a few more (exact) psums
        check_vma=impl not in ("megablox", "tokamax"))
    return fn(x, mask, *params)
