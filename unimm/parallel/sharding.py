"""Mesh, logical axis rules and the shardings they give.

The mesh has four named axes, `data, fsdp, tensor, expert`, sized from the
config (-1 takes the devices the others leave). Model code names logical axes
(`embed`, `heads`, `batch`, ...) on parameters and activations; the config's
rules table maps each logical name to mesh axes. Changing the parallelism never
touches model code.
"""

import contextlib
import math

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unimm.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor", "expert")

_context = {"mesh": None, "rules": None}


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise UserError(f"mesh: only one axis may be -1, got {', '.join(fill)}")
  bad = [a for a, s in sizes.items() if s == 0 or s < -1]
  if bad:
    raise UserError(f"mesh.{bad[0]}={sizes[bad[0]]}: sizes are positive or -1")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if n % fixed:
      raise UserError(
          f"mesh {sizes} does not fit {n} devices: {n} is not a multiple of "
          f"the fixed axes' product {fixed}")
    sizes[fill[0]] = n // fixed
  if math.prod(sizes.values()) != n:
    raise UserError(
        f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n} are available: "
        "make the product of mesh.data/fsdp/tensor/expert equal the device count, or set one to -1")
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    from jax.experimental import mesh_utils
    grid = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # fake CPU devices or odd topologies: plain order
    grid = np.asarray(devices).reshape(shape)
  return Mesh(grid, MESH_AXES)


def logical_to_spec(axes, rules) -> P:
  """Logical names -> PartitionSpec; a mesh axis is used at most once per spec."""
  table = dict(rules)
  used, out = set(), []
  for name in axes:
    if name is not None and name not in table:
      raise UserError(f"logical axis '{name}' has no rule in mesh.rules")
    target = table.get(name) if name is not None else None
    if target is None:
      out.append(None)
      continue
    target = (target,) if isinstance(target, str) else tuple(target)
    unknown = [a for a in target if a not in MESH_AXES]
    if unknown:
      raise UserError(f"mesh.rules maps '{name}' to unknown mesh axis '{unknown[0]}'; "
                      f"mesh axes are {', '.join(MESH_AXES)}")
    target = tuple(a for a in target if a not in used)
    used.update(target)
    out.append(target if len(target) > 1 else (target[0] if target else None))
  return P(*out)


def _spec_size(mesh, entry):
  if entry is None:
    return 1
  names = (entry,) if isinstance(entry, str) else entry
  return math.prod(mesh.shape[a] for a in names)


def sharding_for(mesh, rules, axes, shape, what="array") -> NamedSharding:
  spec = logical_to_spec(axes, rules)
  for dim, entry in zip(shape, spec):
    k = _spec_size(mesh, entry)
    if dim % k:
      raise UserError(
          f"{what} has shape {tuple(shape)} with axes {tuple(axes)}: dimension {dim} "
          f"does not divide over mesh axes {entry} of size {k}; change the model size "
          "or the mesh / mesh.rules")
  return NamedSharding(mesh, spec)


def _is_var(x):
  return isinstance(x, nnx.Variable)


def state_shardings(state, mesh, rules):
  """NamedShardings for an nnx.State of Variables carrying `axes` metadata."""

  def one(path, v):
    axes = v.get_metadata().get("axes") or (None,) * len(v.shape)
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return v.replace(sharding_for(mesh, rules, axes, v.shape, what=f"parameter {name}"))

  return jax.tree_util.tree_map_with_path(one, state, is_leaf=_is_var)


@contextlib.contextmanager
def use_mesh_rules(mesh, rules):
  """Activations annotated with `constrain` inside this context get sharded."""
  old = dict(_context)
  _context.update(mesh=mesh, rules=tuple(rules))
  try:
    yield
  finally:
    _context.update(old)


def constrain(x, axes):
  """Sharding constraint on an activation by logical axis names (no-op without a mesh)."""
  mesh, rules = _context["mesh"], _context["rules"]
  if mesh is None or mesh.size == 1:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(axes, rules)))


_target = {"platform": None}


@contextlib.contextmanager
def target_platform(name):
  """Trace for platform `name` ("cpu", "gpu", "tpu") whatever the devices at hand, e.g. to lower a
  GPU program on a CPU host (`jit(f).trace(...).lower(lowering_platforms=("cuda",))`)."""
  old = _target["platform"]
  _target["platform"] = name
  try:
    yield
  finally:
    _target["platform"] = old


def platform():
  """The platform a program is traced for, where kernels are chosen by backend: the one
  `target_platform` names, else that of the active mesh's devices (`use_mesh_rules`; also an
  ahead-of-time TPU topology), else JAX's default backend. "gpu" for CUDA devices."""
  name = _target["platform"]
  if name is None and _context["mesh"] is not None:
    name = _context["mesh"].devices.flat[0].platform
  name = name or jax.default_backend()
  return "gpu" if name in ("cuda", "rocm") else name


def batch_sharding(mesh, rules, ndim) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (ndim - 1), rules))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
