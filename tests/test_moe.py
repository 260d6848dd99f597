"""Routed MoE: parity with a dense per-expert reference, capacity drops, aux statistics,
expert-parallel equivalence on the 8 fake CPU devices, one-line errors; the kernels and the
dispatch per backend: megablox (Pallas interpret mode) against ragged_dot, "auto" per platform,
the ragged_all_to_all dispatch with the collective emulated, an ahead-of-time TPU compile.

Tiny shapes throughout: D=16, expert hidden F=8, E=8 experts, top_k=2, T=64 tokens.
"""

import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_sharding import assert_one_line
from unimm.config import DEFAULT_RULES, defaults
from unimm.errors import UserError
from unimm.models import moe
from unimm.models.moe import MoE
from unimm.parallel import sharding as shd

D, F, E, K = 16, 8, 8, 2
RTOL = 1e-5


def moe_cfg(**kw):
  c = defaults().model.moe
  c.update(experts=E, top_k=K, expert_dim=F)
  c.update(**kw)
  return c


def make(seed=0, **kw):
  return MoE(D, moe_cfg(**kw), 4 * D, 2, rngs=nnx.Rngs(seed))


def inputs(b=4, l=16, seed=1):
  return jnp.asarray(np.random.default_rng(seed).standard_normal((b, l, D)), jnp.float32)


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  ref = np.max(np.abs(b))
  diff = np.max(np.abs(a - b))
  return 0.0 if diff == 0 else diff / ref


def _silu(v):
  return v / (1.0 + np.exp(-v))


def _swiglu(x, wg, wu, wd):
  return (_silu(x @ wg) * (x @ wu)) @ wd


def reference(model, x, capacity=None):
  """Dense float64 reference: every expert on every token, masked by the routing.

  capacity: slots per expert, filled first choices first (token order), then second choices.
  """
  p = {n: np.asarray(getattr(model, n).value, np.float64)
       for n in ("router", "w_gate", "w_up", "w_down")}
  xf = np.asarray(x, np.float64).reshape(-1, D)
  t = xf.shape[0]
  logits = xf @ p["router"]
  if model.router_kind == "softmax":
    ex = np.exp(logits - logits.max(-1, keepdims=True))
    probs = ex / ex.sum(-1, keepdims=True)
    scores = probs
  else:
    scores = 1.0 / (1.0 + np.exp(-logits))
    probs = scores / scores.sum(-1, keepdims=True)
  top = np.argsort(-scores, axis=-1, kind="stable")[:, :K]  # [T, K]
  w = np.take_along_axis(scores, top, axis=-1)
  if model.renormalize:
    w = w / w.sum(-1, keepdims=True)
  kept = np.ones_like(top, bool)
  if capacity is not None:
    used = np.zeros(E, int)
    for j in range(K):
      for i in range(t):
        e = top[i, j]
        kept[i, j] = used[e] < capacity
        used[e] += 1
  y = np.zeros_like(xf)
  for e in range(E):
    we = np.sum(w * (top == e) * kept, axis=-1)
    y += we[:, None] * _swiglu(xf, p["w_gate"][e], p["w_up"][e], p["w_down"][e])
  if model.shared is not None:
    s = model.shared
    y += _swiglu(xf, *(np.asarray(v.value, np.float64) for v in (s.w_gate, s.w_up, s.w_down)))
  counts = np.bincount(top.reshape(-1), minlength=E)
  load = counts / (t * K)
  mx = logits.max(-1)
  lse = mx + np.log(np.exp(logits - mx[:, None]).sum(-1))
  aux = dict(load=load, lb_loss=E * np.sum(load * probs.mean(0)), z_loss=np.mean(lse ** 2),
             entropy=np.mean(-np.sum(probs * np.log(probs), -1)), assignments=t * K,
             dropped=int(np.sum(~kept)))
  return y.reshape(x.shape), aux


@pytest.mark.parametrize("kw", [
    dict(router="softmax", renormalize=True),
    dict(router="softmax", renormalize=False),
    dict(router="sigmoid", renormalize=True),
    dict(router="sigmoid", renormalize=False),
    dict(router="softmax", renormalize=True, shared_experts=2),
], ids=["softmax-renorm", "softmax", "sigmoid-renorm", "sigmoid", "shared"])
def test_matches_dense_reference(kw):
  model, x = make(**kw), inputs()
  y, aux = jax.jit(lambda m, v: m(v))(model, x)
  ref_y, ref_aux = reference(model, x)
  assert y.shape == x.shape and y.dtype == x.dtype
  assert rel_err(y, ref_y) <= RTOL, rel_err(y, ref_y)
  for name in ("load", "lb_loss", "z_loss", "entropy"):
    assert aux[name].dtype == jnp.float32
    np.testing.assert_allclose(aux[name], ref_aux[name], rtol=RTOL, atol=1e-7, err_msg=name)
  assert float(aux["dropped"]) == 0 and float(aux["assignments"]) == 64 * K
  np.testing.assert_allclose(float(jnp.sum(aux["load"])), 1.0, rtol=1e-6)


def _loss_and_grads(model, x):
  graphdef, state = nnx.split(model)

  def loss(st, v):
    y, aux = nnx.merge(graphdef, st)(v)
    return jnp.mean(y * y) + aux["lb_loss"] + aux["z_loss"], (y, aux)

  (val, (y, aux)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(state, x)
  return val, y, aux, grads


def test_einsum_dropless_equals_ragged():
  x = inputs()
  val_r, y_r, _, g_r = _loss_and_grads(make(impl="ragged"), x)
  val_e, y_e, aux_e, g_e = _loss_and_grads(make(impl="einsum", capacity_factor=0.0), x)
  assert float(aux_e["dropped"]) == 0
  assert rel_err(y_e, y_r) <= 1e-6
  assert abs(float(val_e) - float(val_r)) <= 1e-6 * abs(float(val_r))
  for (path, a), (_, b) in zip(jax.tree_util.tree_flatten_with_path(g_e)[0],
                               jax.tree_util.tree_flatten_with_path(g_r)[0]):
    assert rel_err(a, b) <= 1e-6, jax.tree_util.keystr(path)
    assert np.abs(np.asarray(b)).max() > 0, jax.tree_util.keystr(path)


def test_einsum_capacity_drops():
  model, x = make(impl="einsum", capacity_factor=0.5), inputs()
  y, aux = jax.jit(lambda m, v: m(v))(model, x)
  cap = math.ceil(0.5 * 64 * K / E)
  ref_y, ref_aux = reference(model, x, capacity=cap)
  # dropped = overflow of each expert, whatever the slot order
  counts = np.round(np.asarray(aux["load"]) * 64 * K).astype(int)
  assert int(aux["dropped"]) == int(np.sum(np.maximum(counts - cap, 0))) == ref_aux["dropped"] > 0
  assert rel_err(y, ref_y) <= RTOL  # dropped assignments contribute nothing
  np.testing.assert_allclose(aux["load"], ref_aux["load"], rtol=RTOL)  # load counts before drops


def test_aux_uniform_router_gives_unit_lb_loss():
  model, x = make(), inputs()
  model.router.value = jnp.zeros_like(model.router.value)  # all probs 1/E
  _, aux = jax.jit(lambda m, v: m(v))(model, x)
  # P_e = 1/E for every e and sum_e load_e = 1, so lb_loss = E * (1/E) = 1
  np.testing.assert_allclose(float(aux["lb_loss"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(float(aux["entropy"]), math.log(E), rtol=1e-6)
  np.testing.assert_allclose(float(aux["z_loss"]), math.log(E) ** 2, rtol=1e-6)


# ---------------------------------------------------------------- expert parallelism

MESHES = [(4, 1, 1, 2), (2, 1, 1, 4), (1, 1, 1, 8), (2, 1, 2, 2), (1, 2, 1, 4), (1, 1, 2, 4),
          (2, 2, 2, 1)]  # the last: no expert parallelism, hidden dim over tensor


def _run_on_mesh(model, x, mesh):
  graphdef, state = nnx.split(model)
  if mesh is not None:
    state = jax.device_put(state, shd.state_shardings(state, mesh, DEFAULT_RULES))
    x = jax.device_put(x, shd.batch_sharding(mesh, DEFAULT_RULES, 3))

  def loss(st, v):
    y, aux = nnx.merge(graphdef, st)(v)
    return jnp.mean(y * y) + aux["lb_loss"] + aux["z_loss"], aux

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))  # fresh: traced per mesh
  if mesh is None:
    return jax.device_get(fn(state, x)), ""
  with shd.use_mesh_rules(mesh, DEFAULT_RULES):
    compiled = fn.lower(state, x).compile()
  return jax.device_get(compiled(state, x)), compiled.as_text()


@pytest.fixture(scope="module")
def ep_reference():
  cache = {}

  def get(impl):
    if impl not in cache:
      model = make(impl=impl, shared_experts=1)
      cache[impl] = _run_on_mesh(model, inputs(8, 8, seed=2), None)[0]
    return cache[impl]
  return get


def _check_ep(impl, axes, ep_reference):
  assert len(jax.devices()) == 8, "conftest.py should give 8 fake CPU devices"
  mesh = shd.make_mesh(dict(zip(shd.MESH_AXES, axes)))
  (ref_loss, ref_aux), ref_grads = ep_reference(impl)
  model = make(impl=impl, shared_experts=1)
  ((loss, aux), grads), hlo = _run_on_mesh(model, inputs(8, 8, seed=2), mesh)
  # really expert-parallel: tokens travel to the experts' shards and back
  assert ("all-to-all" in hlo) == (axes[3] > 1)
  assert abs(float(loss) - float(ref_loss)) <= RTOL * abs(float(ref_loss))
  assert float(aux["dropped"]) == 0 and float(aux["assignments"]) == 64 * K
  for name in ("lb_loss", "z_loss", "entropy", "load"):
    assert rel_err(aux[name], ref_aux[name]) <= RTOL, name
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  flat_ref = jax.tree_util.tree_flatten_with_path(ref_grads)[0]
  assert len(flat) == len(flat_ref) == 8  # router, w_gate, w_up, w_down, shared x3, x
  for (path, a), (_, b) in zip(flat, flat_ref):
    assert np.abs(np.asarray(b)).max() > 0, jax.tree_util.keystr(path)
    assert rel_err(a, b) <= RTOL, (jax.tree_util.keystr(path), rel_err(a, b))
  worst = max(rel_err(a, b) for (_, a), (_, b) in zip(flat, flat_ref))
  print(f"\n[{impl} {axes}] loss rel err {abs(float(loss) / float(ref_loss) - 1):.1e}, "
        f"grads max rel err {worst:.1e}")


@pytest.mark.parametrize("axes", MESHES, ids=["-".join(map(str, m)) for m in MESHES])
def test_expert_parallel_matches_single_device(axes, ep_reference):
  _check_ep("ragged", axes, ep_reference)


def test_expert_parallel_einsum_dropless(ep_reference):
  _check_ep("einsum", (2, 1, 2, 2), ep_reference)


# ---------------------------------------------------------------- errors


def test_error_top_k_larger_than_experts():
  with pytest.raises(UserError) as e:
    MoE(D, moe_cfg(experts=8, top_k=9), 4 * D, 2, rngs=nnx.Rngs(0))
  assert_one_line(e, "model.moe.top_k=9", "model.moe.experts=8", "top_k <= experts")
  with pytest.raises(UserError) as e:
    make(top_k=0)
  assert_one_line(e, "model.moe.top_k=0")


def test_error_unknown_impl_and_router():
  with pytest.raises(UserError) as e:
    make(impl="megablocks")
  assert_one_line(e, "megablocks", "auto", "ragged", "einsum", "tokamax", "megablox")
  with pytest.raises(UserError) as e:
    make(router="relu")
  assert_one_line(e, "relu", "softmax", "sigmoid")


def test_error_experts_not_divisible_over_expert_axis():
  mesh = shd.make_mesh(dict(data=2, fsdp=1, tensor=1, expert=4))
  model = MoE(D, moe_cfg(experts=6), 4 * D, 2, rngs=nnx.Rngs(0))
  with shd.use_mesh_rules(mesh, DEFAULT_RULES), pytest.raises(UserError) as e:
    model(inputs(8, 8))
  assert_one_line(e, "model.moe.experts=6", "mesh.expert=4", "multiple of 4")


def test_error_tokamax_missing():
  try:
    import tokamax  # noqa: F401
    pytest.skip("tokamax is installed")
  except ImportError:
    pass
  model = make(impl="tokamax")
  with pytest.raises(UserError) as e:
    model(inputs())
  assert_one_line(e, "tokamax", "pip install", "'ragged' or 'einsum'")


@pytest.mark.parametrize("impl", ["ragged", "einsum"])
def test_padding_is_routed_nowhere(impl):
  """mask=False tokens get no expert rows, no capacity slots and no share of the statistics:
  the real tokens' outputs and statistics equal those of the real tokens alone."""
  cfg = moe_cfg(impl=impl, capacity_factor=0.0)
  layer = MoE(D, cfg, F, 2, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(1), (2, 32, D))
  mask = jnp.arange(32)[None, :] < jnp.array([[20], [32]])  # row 0: 12 padding tokens
  call = jax.jit(lambda m, v, keep=None: m(v, keep))
  y, aux = call(layer, x, mask)
  real = jnp.concatenate([x[0, :20], x[1]])[None]
  y_real, aux_real = call(layer, real)
  np.testing.assert_allclose(jnp.concatenate([y[0, :20], y[1]]), y_real[0], atol=1e-6)
  np.testing.assert_array_equal(np.asarray(y[0, 20:]), 0.0)
  for k in ("lb_loss", "z_loss", "entropy", "assignments"):
    np.testing.assert_allclose(aux[k], aux_real[k], rtol=1e-6, err_msg=k)
  np.testing.assert_allclose(aux["load"], aux_real["load"], atol=1e-7)
  assert float(aux["assignments"]) == 52 * cfg.top_k and float(aux["dropped"]) == 0


# ---------------------------------------------------------------- kernels and dispatch per backend


def test_megablox_tiling():
  assert moe.megablox_tiling(600, 16, 16, jnp.float32) == (512, 16, 16)  # square: whole dims
  assert moe.megablox_tiling(100, 16, 16, jnp.float32) == (104, 16, 16)  # rows: whole sublanes
  assert moe.megablox_tiling(100, 2048, 768, jnp.bfloat16) == (112, 256, 256)  # bf16: 16 rows
  assert moe.megablox_tiling(32768, 2048, 1024, jnp.bfloat16) == (512, 512, 512)
  assert moe.megablox_tiling(64, 16, 8, jnp.float32) is None  # no TPU tile: ragged_dot runs it


def _masked_layer_grads(impl):
  """(value, y) and gradients of a tiny masked layer (600 assignments, 60 padding tokens), the
  jaxpr of its value_and_grad."""
  x = jax.random.normal(jax.random.key(3), (4, 75, D))
  mask = jnp.arange(75)[None, :] < jnp.array([[75], [60], [75], [30]])
  graphdef, state = nnx.split(make(impl=impl, expert_dim=D))

  def loss(st, v):
    y, aux = nnx.merge(graphdef, st)(v, mask)
    return jnp.mean(y * y) + aux["lb_loss"] + aux["z_loss"], y

  traced = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).trace(state, x)
  return traced.lower().compile()(state, x), traced.jaxpr


@pytest.fixture(scope="module")
def ragged_grads():
  return _masked_layer_grads("ragged")[0]


@pytest.mark.parametrize("impl", ["megablox", "tokamax"])
def test_kernel_equals_ragged(impl, ragged_grads):
  """The kernels give ragged_dot's values and gradients. megablox (Pallas interpret mode here):
  two row tiles (600 rows padded to 1024), groups across tile edges, and padding tokens whose
  rows the kernel leaves unwritten (NaN in interpret mode). tokamax: when installed."""
  if impl == "tokamax":
    pytest.importorskip("tokamax", reason="tokamax is not installed")
  ((val, y), grads), jaxpr = _masked_layer_grads(impl)
  assert ("pallas_call" in str(jaxpr)) == (impl == "megablox")  # the kernel, not a fallback
  (val_r, y_r), grads_r = ragged_grads
  assert rel_err(y, y_r) <= RTOL and abs(float(val) / float(val_r) - 1) <= RTOL
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  flat_r = jax.tree_util.tree_flatten_with_path(grads_r)[0]
  assert len(flat) == len(flat_r) == 5  # router, w_gate, w_up, w_down, x
  for (path, a), (_, b) in zip(flat, flat_r):
    assert np.isfinite(np.asarray(a)).all() and np.abs(np.asarray(b)).max() > 0
    assert rel_err(a, b) <= RTOL, (jax.tree_util.keystr(path), rel_err(a, b))


def test_auto_resolves_per_platform(capsys):
  with shd.target_platform("cpu"):
    assert moe.resolve_impl("auto") == "ragged"
  with shd.target_platform("tpu"):
    assert moe.resolve_impl("auto") == "megablox"
  with shd.target_platform("gpu"):
    if moe.installed_tokamax() is not None:
      assert moe.resolve_impl("auto") == "tokamax"
    else:  # ragged_dot, said once
      moe._said.clear()
      assert moe.resolve_impl("auto") == moe.resolve_impl("auto") == "ragged"
      err = capsys.readouterr().err
      assert err.count("tokamax is not installed") == 1 and len(err.splitlines()) == 1
    with pytest.raises(UserError) as e:
      moe.resolve_impl("megablox")
    assert_one_line(e, "megablox", "TPU", "'tokamax', 'ragged' or 'auto'")
  for impl in ("ragged", "einsum"):
    with shd.target_platform("tpu"):
      assert moe.resolve_impl(impl) == impl


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name, axis_index_groups=None):
  """jax.lax.ragged_all_to_all as its docstring defines it, over a padded all_to_all (XLA:CPU
  has no ragged-all-to-all)."""
  assert axis_index_groups is None
  r = jnp.arange(operand.shape[0])
  rows = jnp.clip(input_offsets[:, None] + r, 0, operand.shape[0] - 1)  # [peers, rows]
  send = jnp.where((r < send_sizes[:, None])[..., None], operand[rows], 0)
  recv = jax.lax.all_to_all(send, axis_name, 0, 0, tiled=True)  # block i: from peer i
  at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where peer i's rows go
  dest = jnp.where(r < recv_sizes[:, None], at[:, None] + r, output.shape[0])  # past the end: none
  return output.at[dest].set(recv, mode="drop")


@pytest.mark.parametrize("axes", [(1, 1, 1, 8), (1, 2, 2, 2)], ids=["1-1-1-8", "1-2-2-2"])
def test_ragged_all_to_all_dispatch_matches_single_device(axes, ep_reference, monkeypatch):
  """The GPU / TPU dispatch (offsets and sizes from the gathered counts, receive buffer,
  local-expert sort, reverse trip) with the collective emulated as documented: the loss and
  gradients of one device. expert=8 holds 1 expert per shard (< top_k: the smaller worst case)."""
  calls = []

  def counted(*args, **kw):
    calls.append(kw["axis_name"])
    return emulated_ragged_all_to_all(*args, **kw)

  monkeypatch.setattr(jax.lax, "ragged_all_to_all", counted)
  with shd.target_platform("gpu"):
    _check_ep("ragged", axes, ep_reference)
  assert calls == ["expert", "expert"]  # there and back


def test_gpu_lowering_dispatches_with_ragged_all_to_all():
  """impl "auto" lowered for CUDA from this host (tokamax when installed, else ragged_dot under
  shard_map's type checks): the value_and_grad's trips to the experts and back, forward and
  transposed, are ragged_all_to_all."""
  mesh = shd.make_mesh(dict(data=1, fsdp=2, tensor=1, expert=4))
  graphdef, state = nnx.split(make(shared_experts=1))
  state = jax.device_put(state, shd.state_shardings(state, mesh, DEFAULT_RULES))
  x = jax.device_put(inputs(8, 8), shd.batch_sharding(mesh, DEFAULT_RULES, 3))

  def loss(st, v):
    y, aux = nnx.merge(graphdef, st)(v)
    return jnp.mean(y * y) + aux["lb_loss"], aux

  with shd.use_mesh_rules(mesh, DEFAULT_RULES), shd.target_platform("gpu"):
    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).trace(
        state, x).lower(lowering_platforms=("cuda",))
  assert lowered.as_text().count("stablehlo.custom_call @ragged_all_to_all(") == 4


def test_aot_tpu_auto_is_megablox_with_ragged_all_to_all():
  """impl "auto" compiled ahead of time for a TPU v5p topology (4 chips, mesh expert=4): the
  value_and_grad of a bfloat16 layer under expert parallelism lowers megablox through Mosaic
  and dispatches with ragged_all_to_all."""
  if not os.path.exists(os.environ.get("TPU_LIBRARY_PATH", "")):
    pytest.skip("no libtpu beside the venv (make test installs it): no ahead-of-time TPU compile")
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1")
  mesh = shd.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=4), topo.devices)
  width = 128  # expert dims of whole 128-lane tiles: megablox, not its ragged_dot fallback
  graphdef, state = nnx.split(MoE(width, moe_cfg(expert_dim=2 * width), 4 * width, 2,
                                  rngs=nnx.Rngs(0)))
  state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, jnp.bfloat16, sharding=s),
                       state, shd.state_shardings(state, mesh, DEFAULT_RULES))
  x = jax.ShapeDtypeStruct((8, 32, width), jnp.bfloat16,
                           sharding=shd.batch_sharding(mesh, DEFAULT_RULES, 3))

  def loss(st, v):
    y, aux = nnx.merge(graphdef, st)(v)
    return jnp.mean(y.astype(jnp.float32) ** 2) + aux["lb_loss"], aux

  start = time.perf_counter()
  with shd.use_mesh_rules(mesh, DEFAULT_RULES):
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)).lower(
        state, x).compile()
  seconds = time.perf_counter() - start
  hlo = compiled.as_text()
  # forward: the trip to the experts and back; backward: both transposed
  assert hlo.count(" ragged-all-to-all(") == 4
  # megablox: 3 gmm forward; 3 gmm (d rows) and 3 tgmm (d experts) backward
  assert hlo.count('custom_call_target="tpu_custom_call"') == 9
  mem = compiled.memory_analysis()
  kib = {k: getattr(mem, f"{k}_size_in_bytes") / 2**10 for k in ("argument", "temp")}
  print(f"\n[AOT v5p:2x2x1 expert=4] lower + compile {seconds:.1f} s; per chip: arguments "
        f"{kib['argument']:.0f} KiB, temporaries {kib['temp']:.0f} KiB, code "
        f"{mem.generated_code_size_in_bytes / 2**20:.1f} MiB")
