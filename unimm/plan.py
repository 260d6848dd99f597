"""Plan a pod before paying for one: compile the real train step for a topology on this host.

    python -m unimm.plan --config configs/dense_7b.py --topology v5p-256
    python -m unimm.plan --config configs/demo.py --topology v5p:2x2x1 --config.mesh.fsdp=-1 \
        --config.mesh.data=1 --json

The topology is a Cloud TPU accelerator type (`v5p-256`: 256 TensorCores = 128 chips, two
TensorCores a v5p chip; `v6e-256`, `v5litepod-16`: that many chips), libtpu's name
(`v5p:4x4x8`, CHIP:SHAPE in chips) or `gpu:8xH100` / `gpu:16xH200`. For a TPU the step is
lowered and compiled ahead of time by libtpu over abstract devices of that topology (MaxText's
train_compile): its memory figures are the TPU compiler's. For a GPU there is no compiler on
this host: the step is compiled for as many fake CPU devices, and every memory and collective
figure is labelled estimated (XLA:CPU's buffer assignment, the XLA attention path instead of
the fused kernels).

Printed per device: arguments (parameters, optimizer state, batch), outputs, the part of them
aliased to the donated arguments, temporaries, generated code, and their total against the
chip's HBM (`HBM` below; `--hbm GiB` overrides); FLOPs per step; each collective kind with its
count and bytes per step (`collectives`); the mesh. A config fits when the total leaves
`--spare` (default 0.1) of the HBM free. When it does not, the planner tries the levers that
keep the model the same (`search_candidates`: model.scan, model.remat, the mesh) and prints
the first setting that fits with the command line that uses it. The last line of the output
is the report as JSON (`--json`: only that line); `--dump-hlo FILE` writes the compiled HLO.
"""

import math
import os
import re
import sys
import time

from unimm.errors import UserError, cli

GiB = 2 ** 30

# HBM per device (one JAX device: a v5p chip, its two TensorCores in megacore mode; a GPU).
# Vendor figures, read as GiB (what the runtime reports as its limit is close to these:
# --spare keeps the margin for the runtime's own reservations):
#   v5p   95 GiB  cloud.google.com/tpu/docs/v5p ("HBM2e capacity 95 GB")
#   v6e   32 GiB  cloud.google.com/tpu/docs/v6e ("HBM capacity per chip 32 GB")
#   v5e   16 GiB  cloud.google.com/tpu/docs/v5e ("HBM2 capacity 16 GB")
#   H100  80 GiB  nvidia.com H100 SXM datasheet ("GPU memory 80GB")
#   H200 141 GiB  nvidia.com H200 datasheet ("GPU memory 141GB")
HBM_GIB = {"v5p": 95.0, "v6e": 32.0, "v5e": 16.0, "h100": 80.0, "h200": 141.0}

# Cloud TPU slice shapes (chips -> libtpu shape), from the v5p / v6e / v5e configuration tables.
V5P_SHAPES = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
              256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16",
              6144: "16x16x24"}
V6E_SHAPES = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
              256: "16x16"}
# accelerator-type prefix -> (libtpu chip name, TensorCores counted per chip, shapes)
ACCELERATORS = {"v5p": ("v5p", 2, V5P_SHAPES), "v6e": ("v6e", 1, V6E_SHAPES),
                "v5litepod": ("v5e", 1, V6E_SHAPES), "v5e": ("v5e", 1, V6E_SHAPES)}
GPUS = ("h100", "h200")

REMAT_LADDER = ("none", "save_dots", "full")  # least recompute first
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
BYTES_MEANING = ("bytes: per device and step, the larger of each collective's operand and result "
                 "(all-gather: the gathered result; reduce-scatter: the full operand; the others: "
                 "the buffer), times the loop trips it runs in; a ring moves (n-1)/n of it over "
                 "each device's links")


class Topology:
  """A parsed --topology: platform "tpu" (libtpu name) or "gpu" (fake CPU devices)."""

  def __init__(self, name):
    self.name = name
    spec = name.strip()
    low = spec.lower()
    if low.startswith("gpu:"):
      m = re.fullmatch(r"gpu:(\d+)x([a-z0-9]+)", low)
      if not m or m.group(2) not in GPUS or int(m.group(1)) < 1:
        raise UserError(f"--topology {name}: GPU topologies are gpu:NxH100 or gpu:NxH200 "
                        "(e.g. gpu:8xH100)")
      self.platform, self.chip, self.count = "gpu", m.group(2), int(m.group(1))
      self.libtpu = None
      return
    self.platform = "tpu"
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", low)
    if m:  # libtpu's own name
      chip, shape = m.groups()
      self.chip, self.libtpu = chip, f"{chip}:{shape}"
      self.count = math.prod(int(s) for s in shape.split("x"))
      return
    m = re.fullmatch(r"([a-z0-9]+?)-(\d+)", low)
    known = ", ".join(f"{k}-N" for k in ACCELERATORS)
    if not m or m.group(1) not in ACCELERATORS:
      raise UserError(f"--topology {name} is unknown: use an accelerator type ({known}; e.g. "
                      "v5p-256, v6e-256), libtpu's CHIP:SHAPE (e.g. v5p:4x4x8) or gpu:NxH100")
    prefix, n = m.group(1), int(m.group(2))
    chip, per_chip, shapes = ACCELERATORS[prefix]
    if n % per_chip or n // per_chip not in shapes:
      valid = ", ".join(f"{prefix}-{c * per_chip}" for c in shapes)
      raise UserError(f"--topology {name}: no such slice; {prefix} slices are {valid}"
                      + (" (v5p-N counts TensorCores, 2 a chip)" if per_chip == 2 else ""))
    self.chip, self.count = chip, n // per_chip
    self.libtpu = f"{chip}:{shapes[self.count]}"

  def hbm_bytes(self, override_gib=None):
    if override_gib is not None:
      return int(float(override_gib) * GiB)
    if self.chip not in HBM_GIB:
      raise UserError(f"--topology {self.name}: no HBM size known for {self.chip}: pass "
                      "--hbm GIB")
    return int(HBM_GIB[self.chip] * GiB)

  def devices(self):
    import jax  # pylint: disable=import-outside-toplevel
    if self.platform == "gpu":
      cpus = jax.devices("cpu")
      if len(cpus) < self.count:
        raise UserError(
            f"--topology {self.name} needs {self.count} fake CPU devices, this process has "
            f"{len(cpus)}: run `python -m unimm.plan` (it sets them), or set XLA_FLAGS="
            f"--xla_force_host_platform_device_count={self.count} before JAX starts")
      return cpus[:self.count]
    from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
    try:
      return topologies.get_topology_desc(platform="tpu", topology_name=self.libtpu).devices
    except Exception as e:  # pylint: disable=broad-except
      msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      if "libtpu" in msg.lower() or "tpu" not in os.environ.get("TPU_LIBRARY_PATH", "tpu"):
        raise UserError(f"--topology {self.name}: TPU compiles need libtpu (`pip install "
                        f"libtpu`, or `make test` installs it to .venv/libtpu): {msg}") from None
      raise UserError(f"--topology {self.name}: libtpu does not know {self.libtpu}: {msg}") from None


# ------------------------------------------------------------------ the compiled program's HLO

_SHAPE = re.compile(r"\b(pred|s4|u4|s8|u8|s16|u16|s32|u32|s64|u64|f8e4m3fn|f8e5m2|f8e4m3fnuz|"
                    r"f8e5m2fnuz|bf16|f16|f32|f64|c64|c128)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2,
          "f16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8,
          "c128": 16}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")


def _shapes(text):
  """[(dtype, dims)] of the array shapes in `text` (a tuple gives several)."""
  out = []
  for dtype, dims in _SHAPE.findall(text):
    out.append((dtype, tuple(int(d) for d in dims.split(",") if d)))
  return out


def _nbytes(shapes):
  return sum(_BYTES.get(t, 4) * math.prod(d) for t, d in shapes)


def _group_size(attrs):
  m = re.search(r"replica_groups=\{\{([\d,]*)\}", attrs)
  if m:
    return len(m.group(1).split(","))
  m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if m:
    sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
    return math.prod(int(sizes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
  m = re.search(r"replica_groups=\[([\d,]+)\]<=", attrs)
  if m:
    return int(m.group(1).split(",")[-1])
  return 1


def parse_hlo(text):
  """{computation: {"entry", "instrs": [(name, result text, op, rest)], "shapes": {name: text}}}
  of an HLO module's text."""
  comps, cur = {}, None
  for line in text.splitlines():
    if cur is None:
      m = _COMP.match(line)
      if m and not line.startswith(" "):
        cur = {"entry": line.startswith("ENTRY"), "instrs": [], "shapes": {}}
        comps[m.group(1)] = cur
        for pname, ptype in re.findall(r"([\w.\-]+):\s*((?:\([^)]*\))|[\w\[\],{}:()]+)",
                                       m.group(2) or ""):
          cur["shapes"][pname] = ptype
      continue
    if line.startswith("}"):
      cur = None
      continue
    m = _INSTR.match(line)
    if m:
      name, result, op, rest = m.groups()
      cur["instrs"].append((name, result, op, rest))
      cur["shapes"][name] = result
  return comps


def _trip_count(comps, instr_rest):
  m = re.search(r'known_trip_count[^0-9]*(\d+)', instr_rest)
  if m:
    return int(m.group(1)), True
  m = re.search(r"condition=%?([\w.\-]+)", instr_rest)
  cond = comps.get(m.group(1)) if m else None
  if cond:
    consts = [int(c) for _, r, op, rest in cond["instrs"] if op == "constant"
              for c in re.findall(r"^(-?\d+)\)", rest)]
    compare = [rest for _, _, op, rest in cond["instrs"] if op == "compare"]
    if len(consts) == 1 and compare and "direction=LT" in compare[-1] and consts[0] > 0:
      return consts[0], True
  return 1, False


def _called(rest):
  """Computations an instruction runs: [(name, role)]."""
  out = []
  for role in ("calls", "body", "condition", "to_apply", "true_computation",
               "false_computation"):
    for m in re.finditer(rf"\b{role}=%?([\w.\-]+)", rest):
      out.append((m.group(1), role))
  m = re.search(r"branch_computations=\{([^}]*)\}", rest)
  if m:
    out += [(n.strip().lstrip("%"), "branch") for n in m.group(1).split(",")]
  return out


def _dot_flops(comp, op, result, rest):
  out = _shapes(result)
  if not out:
    return 0
  n_out = math.prod(out[0][1])
  operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
  if op == "dot":
    m = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    lhs = _shapes(comp["shapes"].get(operands[0], "")) if operands else []
    if not m or not lhs:
      return 0
    k = math.prod(lhs[0][1][int(i)] for i in m.group(1).split(",") if i)
    return 2 * n_out * k
  # convolution: 2 * output elements * the kernel elements each one meets (input features,
  # and per spatial dim the window, at most the input's extent: TPU writes some dots as
  # convolutions with padded windows)
  lhs = _shapes(comp["shapes"].get(operands[0], "")) if operands else []
  kern = _shapes(comp["shapes"].get(operands[1], "")) if len(operands) > 1 else []
  m = re.search(r"dim_labels=(\w+)_(\w+)->", rest)
  if not kern or not lhs or not m or len(m.group(2)) != len(kern[0][1]) or len(
      m.group(1)) != len(lhs[0][1]):
    return 0
  lhs_dims = dict(zip(m.group(1), lhs[0][1]))
  per_out = 1
  for lab, d in zip(m.group(2), kern[0][1]):
    if lab == "i":
      per_out *= d
    elif lab != "o":
      per_out *= min(d, lhs_dims.get(lab, d))
  groups = re.search(r"feature_group_count=(\d+)", rest)
  return 2 * n_out * per_out // (int(groups.group(1)) if groups else 1)


_FUSED = (("all-reduce-scatter", "reduce-scatter"), ("reduce-scatter", "reduce-scatter"),
          ("all-gather", "all-gather"), ("all-to-all", "all-to-all"),
          ("collective-permute", "collective-permute"), ("all-reduce", "all-reduce"))


def _fused_kind(computation):
  """The collective a TPU collective fusion computation implements, by its name: the TPU
  compiler writes a reduce-scatter as an all-reduce and a slice in `%all-reduce-scatter.N`."""
  return next((kind for prefix, kind in _FUSED if computation.startswith(prefix)), None)


def analyze_hlo(text):
  """Collectives ({kind: {"count", "bytes"}}, per device and step: loop bodies times their trip
  counts), matmul FLOPs (dot / convolution ops, likewise; custom kernels not included) and
  whether every loop's trip count was found, from a compiled (partitioned) HLO module."""
  comps = parse_hlo(text)
  entry = next((n for n, c in comps.items() if c["entry"]), None)
  counts = {}
  if entry is None:
    return {}, 0, True
  # executions of each computation per step, by walking from the entry (calls before callers)
  order, seen = [], set()

  def visit(name):
    if name in seen or name not in comps:
      return
    seen.add(name)
    for _, _, _, rest in comps[name]["instrs"]:
      for callee, _ in _called(rest):
        visit(callee)
    order.append(name)

  visit(entry)
  runs = {n: 0 for n in order}
  runs[entry] = 1
  known = True
  fused = {}  # TPU collective fusions (all-reduce + slice = reduce-scatter, ...): computation -> kind
  for name in reversed(order):  # callers first
    for _, _, op, rest in comps[name]["instrs"]:
      trips = 1
      if op == "while":
        trips, found = _trip_count(comps, rest)
        known &= found
      for callee, role in _called(rest):
        if callee in runs:
          runs[callee] += runs[name] * (trips if role in ("body", "condition") else 1)
          kind = _fused_kind(callee) if role == "calls" and op == "fusion" else None
          if kind and any(o in COLLECTIVES for _, _, o, _ in comps[callee]["instrs"]):
            fused[callee] = kind
  flops = 0
  for name in order:
    comp, n = comps[name], runs[name]
    if not n:
      continue
    for iname, result, op, rest in comp["instrs"]:
      if op in ("dot", "convolution"):
        flops += n * _dot_flops(comp, op, result, rest)
      if op == "fusion":
        m = re.search(r"calls=%?([\w.\-]+)", rest)
        if m and m.group(1) in fused:  # counted once, as the fusion's kind, its largest buffer
          inner = [_nbytes(_shapes(r)) for _, r, o, _ in comps[m.group(1)]["instrs"]
                   if o in COLLECTIVES]
          _add(counts, fused[m.group(1)], n, max(inner) if inner else 0)
        continue
      if name in fused:
        continue
      kind = op[:-len("-start")] if op.endswith("-start") else op
      if kind not in COLLECTIVES:
        continue
      shapes = _shapes(result)
      size = _nbytes(shapes)
      if op.endswith("-start") and kind in ("all-gather", "collective-permute"):
        arrays = [s for s in shapes if s[1]]  # (operands, results, [u32 contexts])
        size = _nbytes(arrays[len(arrays) // 2:]) if len(arrays) > 1 else size
      if kind == "reduce-scatter":
        size *= _group_size(rest)
      _add(counts, kind, n, size)
  return counts, flops, known


def _add(counts, kind, n, size):
  c = counts.setdefault(kind, {"count": 0, "bytes": 0})
  c["count"] += n
  c["bytes"] += int(n * size)


# ------------------------------------------------------------------ one compile


def _set(cfg, setting):
  cfg = cfg.copy_and_resolve_references()
  for k, v in setting.items():
    section, field = k.split(".", 1)
    if section == "mesh":
      cfg.mesh[field] = v
    else:
      cfg.model[field] = v
  return cfg


def _mesh_sizes(cfg, n):
  sizes = {a: int(cfg.mesh[a]) for a in ("data", "fsdp", "tensor", "expert")}
  fill = [a for a, s in sizes.items() if s == -1]
  if fill:
    fixed = math.prod(s for s in sizes.values() if s != -1)
    sizes[fill[0]] = n // fixed if fixed and n % fixed == 0 else -1
  return sizes


def compile_step(cfg, devices):
  """(compiled train step, mesh, seconds to compile) of `cfg` over `devices`."""
  # pylint: disable=import-outside-toplevel
  from unimm.data.tokenizer import load_tokenizer
  from unimm.parallel.sharding import make_mesh
  from unimm.train.step import Trainer
  mesh = make_mesh(cfg.mesh, devices)
  rows = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
  if cfg.data.batch_size % rows:
    raise UserError(f"data.batch_size={cfg.data.batch_size} does not divide over the "
                    f"{rows} batch shards of mesh {dict(mesh.shape)} (data x fsdp x expert): "
                    f"use a multiple of {rows}")
  trainer = Trainer(cfg, mesh, load_tokenizer(cfg.data.tokenizer).model_vocab_size())
  lowered = trainer.train_step.lower(trainer.abstract_state, *trainer.abstract_inputs())
  start = time.perf_counter()
  compiled = lowered.compile()
  params = sum(math.prod(x.shape) for x in
               __import__("jax").tree.leaves(trainer.abstract_state["params"]))
  return compiled, mesh, time.perf_counter() - start, params


def measure(cfg, topo, hbm, spare, dump=None):
  """The report of one compile of `cfg` on `topo` (a dict, see the module docstring); `dump`:
  a path to write the compiled HLO text to."""
  compiled, mesh, seconds, params = compile_step(cfg, topo.devices())
  if dump:
    with open(dump, "w") as f:
      f.write(compiled.as_text())
  mem = compiled.memory_analysis()
  m = {k: int(getattr(mem, f"{k}_size_in_bytes")) for k in
       ("argument", "output", "alias", "temp", "generated_code", "host_temp", "host_argument")}
  total = m["argument"] + m["output"] - m["alias"] + m["temp"] + m["generated_code"]
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  collectives, matmul_flops, trips_known = analyze_hlo(compiled.as_text())
  b, length = int(cfg.data.batch_size), int(cfg.data.seq_len)
  return {
      "mesh": {a: int(s) for a, s in mesh.shape.items()},
      "remat": cfg.model.remat, "scan": bool(cfg.model.scan),
      "memory": {"arguments": m["argument"], "outputs": m["output"], "aliased": m["alias"],
                 "temporaries": m["temp"], "code": m["generated_code"], "total": total,
                 "host": m["host_temp"] + m["host_argument"], "hbm": hbm,
                 "spare_fraction": round(1 - total / hbm, 4)},
      "fits": total <= hbm * (1 - spare),
      "flops": {"xla_cost_analysis": float(cost.get("flops", 0.0)) if cost else None,
                "matmul_hlo": float(matmul_flops)},
      "collectives": collectives,
      "loop_trips_known": trips_known,
      "params": int(params),
      "batch": {"rows": b, "seq_len": length, "tokens": b * length},
      "compile_s": round(seconds, 1),
  }


# ------------------------------------------------------------------ the search


def _divisors(n):
  return [d for d in range(1, n + 1) if n % d == 0]


def search_candidates(cfg, n):
  """Settings (dicts of dotted config keys) that keep the model and batch, in the order tried:
  first the config as it is; then, with blocks scanned, for each remat policy from the config's
  on (none, save_dots, full: least recompute first) the config's mesh and the mesh with all of
  data on fsdp (data=1, fsdp=-1); then the same with tensor parallelism 2, 4, 8 (fsdp over the
  rest). Meshes whose batch
  shards do not divide the batch are left out."""
  base = _mesh_sizes(cfg, n)
  own = {"model.remat": cfg.model.remat, "model.scan": bool(cfg.model.scan),
         **{f"mesh.{a}": v for a, v in base.items()}}
  rows = int(cfg.data.batch_size)

  def mesh(tensor):
    if n % (tensor * base["expert"]):
      return None
    m = dict(data=1, fsdp=n // (tensor * base["expert"]), tensor=tensor, expert=base["expert"])
    return m if rows % (m["data"] * m["fsdp"] * m["expert"]) == 0 else None

  phases = [[base, mesh(base["tensor"])], [mesh(t) for t in (2, 4, 8) if t > base["tensor"]]]
  start = REMAT_LADDER.index(cfg.model.remat) if cfg.model.remat in REMAT_LADDER else 0
  out = [{}]
  for meshes in phases:
    meshes = [m for m in meshes if m and -1 not in m.values() and math.prod(m.values()) == n]
    for remat in REMAT_LADDER[start:]:
      for m in meshes:
        s = {f"mesh.{a}": v for a, v in m.items()}
        s.update({"model.remat": remat, "model.scan": True})
        if s not in out and s != own:
          out.append(s)
  return out


def _quiet_error(e):
  text = str(e).strip()
  line = next((l for l in text.splitlines() if l.strip()), type(e).__name__)
  return line[:300]


def _is_oom(e):
  text = str(e)
  return "RESOURCE_EXHAUSTED" in text or "Ran out of memory" in text or "exceeds" in text and (
      "memory" in text.lower())


def plan(cfg, topology, hbm_gib=None, spare=0.1, search=True, max_tries=8, log=print, dump=None):
  """Compile `cfg` for `topology` (a string); when it does not fit, search (see
  `search_candidates`). Returns the report dict; raises UserError when nothing fits."""
  topo = Topology(topology)
  hbm = topo.hbm_bytes(hbm_gib)
  if not 0 <= spare < 1:
    raise UserError(f"--spare {spare}: a fraction of the HBM, 0 <= spare < 1")
  n = topo.count
  sizes = _mesh_sizes(cfg, n)
  if -1 in sizes.values() or math.prod(sizes.values()) != n:
    raise UserError(
        f"mesh {dict((a, int(cfg.mesh[a])) for a in sizes)} does not divide {topology} "
        f"({n} devices): make data x fsdp x tensor x expert = {n}, or set one axis to -1 "
        f"(e.g. --config.mesh.data=1 --config.mesh.fsdp=-1)")
  tried, best = [], None
  candidates = search_candidates(cfg, n) if search else [{}]
  for setting in candidates[:max(1, max_tries)]:
    trial = _set(cfg, setting)
    try:
      report = measure(trial, topo, hbm, spare, **({"dump": dump} if dump else {}))
    except UserError as e:
      if not setting:
        raise
      tried.append({"setting": setting, "error": str(e)})
      continue
    except Exception as e:  # pylint: disable=broad-except
      if _is_oom(e):
        tried.append({"setting": setting, "error": "out of memory: " + _quiet_error(e)})
        if log and not setting:
          log(f"  as configured: the compiler ran out of memory ({_quiet_error(e)[:120]})")
        continue
      raise UserError(f"compiling for {topology} failed: {_quiet_error(e)}") from None
    report["setting"] = setting
    tried.append({"setting": setting, "total": report["memory"]["total"],
                  "fits": report["fits"], "compile_s": report["compile_s"]})
    if not setting:
      best = report
    if log and (setting or not report["fits"]):
      log(f"  tried {_flags(setting) or 'the config as is'}: {_gib(report['memory']['total'])} "
          f"({'fits' if report['fits'] else 'does not fit'})")
    if report["fits"]:
      best = report
      break
  if best is None or (search and not best["fits"]):
    close = min((t for t in tried if "total" in t), key=lambda t: t["total"], default=None)
    near = (f"; the smallest was {_gib(close['total'])} with {_flags(close['setting']) or 'the config as is'}"
            if close else "")
    if not search:
      raise UserError(f"{topology}: the config as given does not compile within "
                      f"{_gib(hbm)} HBM per device ({tried[-1].get('error', 'out of memory')}): "
                      "run without --no-search for a setting that fits")
    raise UserError(
        f"{topology}: no setting tried ({len(tried)}: remat {'/'.join(REMAT_LADDER)}, scan, "
        f"fsdp and tensor meshes) fits {_gib(hbm * (1 - spare))} per device "
        f"({_gib(hbm)} HBM less {spare:.0%} spare){near}: use a bigger topology, a smaller "
        "data.batch_size or model, or --config.optim.mu_dtype=bfloat16")
  best.update(topology=topology, libtpu_topology=topo.libtpu, platform=topo.platform,
              chip=topo.chip, devices=n, estimated=topo.platform == "gpu", spare=spare,
              tried=tried, bytes_meaning=BYTES_MEANING)
  return best


# ------------------------------------------------------------------ printing


def _gib(b):
  return f"{b / GiB:.1f} GiB" if abs(b) >= GiB else f"{b / 2**20:.1f} MiB"


def _flags(setting):
  return " ".join(f"--config.{k}={str(v).lower() if isinstance(v, bool) else v}"
                  for k, v in setting.items())


def command(argv, setting):
  """The plan command line `argv` with `setting`'s overrides replacing any of the same keys."""
  keep = [a for a in argv if not any(a.startswith(f"--config.{k}=") for k in setting)
          and a != "--json"]
  return " ".join(["python -m unimm.plan", *keep, _flags(setting)]).strip()


def text_report(r, argv):
  est = " (estimated: compiled for fake CPU devices)" if r["estimated"] else ""
  m = r["memory"]
  lines = [
      f"{r['topology']}: {r['devices']} {r['chip']} devices"
      + (f" (libtpu {r['libtpu_topology']})" if r["libtpu_topology"] else "") + est,
      f"mesh {r['mesh']}, remat {r['remat']}, scan {str(r['scan']).lower()}; batch "
      f"{r['batch']['rows']} x {r['batch']['seq_len']} tokens; {r['params'] / 1e9:.2f}B "
      f"parameters; compiled in {r['compile_s']:.1f} s",
      f"memory per device{est}: arguments {_gib(m['arguments'])}, outputs {_gib(m['outputs'])} "
      f"(aliased {_gib(m['aliased'])}), temporaries {_gib(m['temporaries'])}, code "
      f"{_gib(m['code'])}: total {_gib(m['total'])} of {_gib(m['hbm'])} HBM, "
      f"{m['spare_fraction']:.0%} spare" + (f"; host {_gib(m['host'])}" if m["host"] else "")
      + (" (fits)" if r["fits"] else f" (does not fit with {r['spare']:.0%} spare)"),
      f"FLOPs per device and step: {r['flops']['matmul_hlo']:.3e} in matmuls (HLO, loops "
      f"counted by trips, custom kernels not included); XLA cost analysis "
      f"{r['flops']['xla_cost_analysis'] or 0:.3e} (loop bodies once)",
  ]
  coll = r["collectives"]
  if coll:
    lines.append(f"collectives per device and step{est}: " + ", ".join(
        f"{k} {v['count']} x, {_gib(v['bytes'])}" for k, v in sorted(coll.items()))
                 + ("" if r["loop_trips_known"] else " (a loop's trip count unknown: counted once)"))
    lines.append(f"  ({BYTES_MEANING})")
  else:
    lines.append("collectives: none")
  if r["setting"]:
    lines.append(f"best setting that fits: {_flags(r['setting'])}")
    lines.append(f"  {command(argv, r['setting'])}")
  return "\n".join(lines)


def _setup_env(topology):
  """Environment for JAX before it starts: libtpu for TPU topologies, fake CPU devices for GPU."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  low = topology.lower()
  if low.startswith("gpu:"):
    m = re.fullmatch(r"gpu:(\d+)x\w+", low)
    n = int(m.group(1)) if m else 1
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                   os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    return
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # no TPU VM metadata here
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiles only, no TPU opened
  lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".venv",
                     "libtpu", "libtpu", "libtpu.so")
  if os.path.exists(lib):  # where `make test` installs it (a pip-installed libtpu is found)
    os.environ.setdefault("TPU_LIBRARY_PATH", lib)


def main(argv):
  import json  # pylint: disable=import-outside-toplevel
  from unimm.config import parse_args  # pylint: disable=import-outside-toplevel
  cfg, opts = parse_args(argv, flags=("topology", "hbm", "spare", "max-tries", "dump-hlo"),
                         switches=("json", "no-search"))
  if not opts["topology"]:
    raise UserError("--topology is required (e.g. --topology v5p-256, v6e-256, v5p:4x4x8, "
                    "gpu:8xH100)")
  Topology(opts["topology"])  # bad names fail before JAX starts
  if "jax" not in sys.modules:
    _setup_env(opts["topology"])

  def number(name, default, kind=float):
    if opts[name] is None:
      return default
    try:
      return kind(opts[name])
    except ValueError:
      raise UserError(f"--{name} {opts[name]}: expected a number") from None

  report = plan(cfg, opts["topology"], hbm_gib=number("hbm", None), spare=number("spare", 0.1),
                search=not opts["no-search"], max_tries=number("max-tries", 8, int),
                log=None if opts["json"] else print, dump=opts["dump-hlo"])
  if not opts["json"]:
    print(text_report(report, argv))
  report["command"] = command(argv, report["setting"])
  print(json.dumps(report, sort_keys=True))


if __name__ == "__main__":
  cli(main)
