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
  "tokamax"  the same with `tokamax.ragged_dot` (optional extra, GPU).
  "einsum"   capacity-padded: C = ceil(capacity_factor * T * k / E) slots per expert (0: C = T,
             dropless). Slots are filled in priority order: every token's first choice (in token
             order), then every token's second choice, ...; assignments past slot C are dropped
             (they add nothing to y) and counted in aux["dropped"].

Expert parallelism: with an active mesh (`unimm.parallel.sharding.use_mesh_rules`, more than
one device) routing and experts run in `jax.shard_map` over the whole mesh. Tokens keep the
sharding of the logical axes ("batch", "length") (by default the batch over data, fsdp and
expert); experts are split over the mesh axes of the logical axis "exp" (by default "expert")
and each expert's hidden dim over those of "mlp" (by default "tensor"). Each device routes its
own tokens, then
  ragged: sends every assignment to the shard owning its expert with `jax.lax.all_to_all` over
          fixed-size buffers of T_loc * k rows per destination (the dropless worst case; XLA:CPU
          has no ragged all-to-all), each row carrying its local expert id (padding rows carry
          E_loc and sort last). The receiving shard sorts rows by local expert and runs
          ragged_dot over its E_loc experts (rows past sum(group_sizes) come out zero and are
          never read back); a reverse all_to_all brings the results home.
  einsum: builds its [E, C, D] slot buffer from its own tokens (capacity is per token shard:
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

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from unimm.errors import UserError
from unimm.models import layers
from unimm.parallel import sharding as shd

ROUTERS = ("softmax", "sigmoid")
IMPLS = ("ragged", "einsum", "tokamax")


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


def _ragged_dot_fn(impl):
  if impl == "tokamax":
    try:
      import tokamax
    except ImportError:
      raise UserError(
          "model.moe.impl='tokamax' needs the tokamax package (pip install 'unimm[tokamax]', "
          "jax >= 0.11.1, GPU); use 'ragged' or 'einsum'") from None
    return tokamax.ragged_dot
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


def _swiglu_grouped(xs, w_gate, w_up, w_down, group_sizes, ragged_dot):
  gate = ragged_dot(xs, w_gate, group_sizes)
  up = ragged_dot(xs, w_up, group_sizes)
  return ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)


def _combine(out, weights, dtype):
  """out [T * k, D] in (token, k) order, weights [T, k] -> [T, D]."""
  t, k = weights.shape
  out = out.reshape(t, k, -1).astype(jnp.float32)
  return jnp.sum(out * weights[..., None], axis=1).astype(dtype)


def _experts_ragged(x, weights, experts, w_gate, w_up, w_down, *, num_experts, ep_axes, ep,
                    ragged_dot):
  """Dropless routed experts: x [T, D] -> [T, D] (partial over a sharded hidden dim)."""
  t, k = experts.shape
  flat = experts.reshape(-1)  # [A], assignment a = token a // k, choice a % k
  order = jnp.argsort(flat, stable=True)
  sorted_e = flat[order]
  xs = x[order // k]  # [A, D] grouped by expert
  if ep == 1:  # padding (id E) sorts last, outside every group: its rows come out 0
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    out_sorted = _swiglu_grouped(xs, w_gate, w_up, w_down, group_sizes, ragged_dot)
  else:
    a = t * k
    e_loc = num_experts // ep
    dest, local_id = sorted_e // e_loc, sorted_e % e_loc  # padding: dest ep, sent nowhere
    start = jnp.cumsum(jnp.bincount(dest, length=ep)) - jnp.bincount(dest, length=ep)
    pos = jnp.arange(a) - start[jnp.minimum(dest, ep - 1)]  # row within its destination's buffer
    send_x = jnp.zeros((ep, a, x.shape[-1]), x.dtype).at[dest, pos].set(xs, mode="drop")
    send_id = jnp.full((ep, a), e_loc, jnp.int32).at[dest, pos].set(local_id, mode="drop")
    axis = _axis_arg(ep_axes)
    recv_x = jax.lax.all_to_all(send_x, axis, 0, 0, tiled=True).reshape(ep * a, -1)
    recv_id = jax.lax.all_to_all(send_id, axis, 0, 0, tiled=True).reshape(ep * a)
    r_order = jnp.argsort(recv_id, stable=True)  # padding (id e_loc) sorts last
    group_sizes = jnp.bincount(recv_id, length=e_loc).astype(jnp.int32)  # drops padding
    r_out = _swiglu_grouped(recv_x[r_order], w_gate, w_up, w_down, group_sizes, ragged_dot)
    r_out = jnp.zeros_like(r_out).at[r_order].set(r_out).reshape(ep, a, -1)
    back = jax.lax.all_to_all(r_out, axis, 0, 0, tiled=True)
    out_sorted = back.at[dest, pos].get(mode="fill", fill_value=0)
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
      raise UserError(f"model.moe.impl='{moe_cfg.impl}' is unknown: use 'ragged', 'einsum' or "
                      "'tokamax'")
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

  def _local(self, x, mask, router, w_gate, w_up, w_down, *, ep_axes=(), ep=1, token_axes=(),
             mlp_axes=()):
    """x [B, L, D], mask [B, L] (this device's tokens) -> (y [B, L, D], aux)."""
    b, l, d = x.shape
    xf = x.reshape(b * l, d)
    weights, experts, stats = _route(xf, mask.reshape(b * l), router, self.top_k,
                                     self.router_kind, self.renormalize)
    kw = dict(num_experts=self.num_experts, ep_axes=ep_axes, ep=ep)
    if self.impl == "einsum":
      y, dropped = _experts_einsum(xf, weights, experts, w_gate, w_up, w_down,
                                   capacity_factor=self.capacity_factor, **kw)
    else:
      y = _experts_ragged(xf, weights, experts, w_gate, w_up, w_down,
                          ragged_dot=_ragged_dot_fn(self.impl), **kw)
      dropped = jnp.zeros((), jnp.int32)
    if mlp_axes:  # the hidden dim is split: partial sums of the down projection
      y = jax.lax.psum(y, _axis_arg(mlp_axes))
    if token_axes:  # global statistics
      stats, dropped = jax.lax.psum((stats, dropped), _axis_arg(token_axes))
    return y.reshape(b, l, d), _aux(stats, self.top_k, dropped)

  def __call__(self, x, mask=None):
    """x [B, L, D], mask [B, L] bool (True: a real token; None: all) -> (y, aux)."""
    mask = jnp.ones(x.shape[:2], bool) if mask is None else mask.astype(bool)
    if self.impl == "tokamax":
      _ragged_dot_fn(self.impl)  # the one-line error before any tracing
    params = (self.router.value, self.w_gate.value, self.w_up.value, self.w_down.value)
    active = _active_mesh()
    if active is None:
      y, aux = self._local(x, mask, *params)
    else:
      y, aux = self._sharded(x, mask, params, *active)
    if self.shared is not None:
      y = y + self.shared(x)
    return y, aux

  def _sharded(self, x, mask, params, mesh, rules):
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
        lambda *a: self._local(*a, ep_axes=ep_axes, ep=ep, token_axes=token_axes,
                               mlp_axes=mlp_axes),
        mesh=mesh,
        in_specs=(x_spec, P(act[0], act[1]), P(), w_in, w_in, w_out),
        out_specs=(x_spec, P()))
    return fn(x, mask, *params)
