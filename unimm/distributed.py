"""Joins one multi-host JAX job: the arguments of `jax.distributed.initialize` from the environment.

Nothing happens unless `UNIMM_DISTRIBUTED=1` (the launch/ scripts set it). Then, in this order:

- explicit variables (launch/gpu.sh on hosts you start yourself): `JAX_COORDINATOR_ADDRESS=host:port`,
  `NNODES`, `NODE_RANK`;
- SLURM (launch/slurm.sh, one process per node under srun): the first host of
  `SLURM_STEP_NODELIST` (or `SLURM_JOB_NODELIST`) is the coordinator, on `UNIMM_COORDINATOR_PORT`
  or a port derived from `SLURM_JOB_ID` as JAX does; `SLURM_NTASKS` processes, this one
  `SLURM_PROCID`;
- Cloud TPU workers (TPU VMs, GKE JobSets, xpk: `TPU_WORKER_HOSTNAMES`, `TPU_WORKER_ID`,
  `MEGASCALE_*`) and anything else: JAX detects the cluster itself (`{}`).

Variables that contradict each other raise `UserError` with one line that names the variable.
"""
import os
import re

from unimm.errors import UserError

_SLURM_PORT_BASE = 65535 - 2**12 + 1  # JAX's own SLURM choice: a port in [61440, 65535]


def _int(environ, name, fix, lo=None):
  """`environ[name]` as an int (at least `lo`), or a UserError that says `fix`."""
  raw = environ.get(name)
  if raw is None or raw.strip() == "":
    raise UserError(f"{name} is not set: {fix}")
  try:
    value = int(raw)
  except ValueError:
    raise UserError(f"{name}={raw!r} is not an integer: {fix}") from None
  if lo is not None and value < lo:
    raise UserError(f"{name}={value} must be at least {lo}: {fix}")
  return value


def _rank(environ, name, count, count_name, fix):
  rank = _int(environ, name, fix, lo=0)
  if rank >= count:
    raise UserError(f"{name}={rank} must be below {count_name}={count}: {fix}")
  return rank


def _port(raw, name):
  if not raw.isdigit() or not 0 < int(raw) < 65536:
    raise UserError(f"{name} has port {raw!r}: use a number from 1 to 65535")
  return int(raw)


def expand_nodelist(nodelist, name="SLURM_JOB_NODELIST"):
  """Host names of a SLURM host list such as "gpu[001-004,007],login1", in order."""
  fix = f"{name}={nodelist!r} is not a SLURM host list like 'gpu[001-004,007],login1'"
  hosts, depth, start = [], 0, 0
  for i, ch in enumerate(nodelist + ","):
    if ch == "[":
      depth += 1
    elif ch == "]":
      depth -= 1
    if depth not in (0, 1):
      raise UserError(fix)
    if ch == "," and depth == 0:
      hosts += _expand_host(nodelist[start:i], fix)
      start = i + 1
  if depth:
    raise UserError(fix)
  return hosts


def _expand_host(pattern, fix):
  m = re.fullmatch(r"([^\[\],]*)\[([^\[\]]+)\](.*)", pattern)
  if not m:
    if not pattern or re.search(r"[\[\]\s]", pattern):
      raise UserError(fix)
    return [pattern]
  prefix, ranges, rest = m.groups()
  names = []
  for part in ranges.split(","):
    r = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
    if not r or (r[2] is not None and int(r[2]) < int(r[1])):
      raise UserError(fix)
    width = len(r[1])
    for n in range(int(r[1]), int(r[2] or r[1]) + 1):
      names.append(f"{prefix}{n:0{width}d}")
  tails = _expand_host(rest, fix) if rest else [""]
  return [n + t for n in names for t in tails]


def _explicit(environ):
  fix = ("on every host set NNODES (hosts in the job), NODE_RANK (0..NNODES-1) and "
         "JAX_COORDINATOR_ADDRESS=host0:port (see launch/gpu.sh)")
  nnodes = _int(environ, "NNODES", fix, lo=1)
  rank = _rank(environ, "NODE_RANK", nnodes, "NNODES", fix) if nnodes > 1 or "NODE_RANK" in environ else 0
  if nnodes == 1:
    return None
  address = environ.get("JAX_COORDINATOR_ADDRESS", "").strip()
  if not address:
    raise UserError(f"JAX_COORDINATOR_ADDRESS is not set (NNODES={nnodes}): {fix}")
  host, _, port = address.rpartition(":")
  if not host:
    raise UserError(f"JAX_COORDINATOR_ADDRESS={address!r} has no port: write it as host0:port, e.g. host0:1234")
  _port(port, "JAX_COORDINATOR_ADDRESS")
  # "deactivate": JAX would otherwise fill the rest in from SLURM/MPI and hide all GPUs but one.
  return dict(coordinator_address=address, num_processes=nnodes, process_id=rank,
              cluster_detection_method="deactivate")


def _slurm(environ):
  fix = "start one process per node with srun (launch/slurm.sh does)"
  ntasks = _int(environ, "SLURM_NTASKS", fix, lo=1)
  if ntasks == 1:
    return None
  rank = _rank(environ, "SLURM_PROCID", ntasks, "SLURM_NTASKS", fix)
  name = next((n for n in ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
               if environ.get(n)), None)
  if name is None:
    raise UserError(f"SLURM_JOB_NODELIST is not set (SLURM_NTASKS={ntasks}): {fix}")
  hosts = expand_nodelist(environ[name], name)
  if ntasks < len(hosts):
    raise UserError(f"SLURM_NTASKS={ntasks} is fewer than the {len(hosts)} hosts of {name}: "
                    f"{fix}")
  if "UNIMM_COORDINATOR_PORT" in environ:
    port = _port(environ["UNIMM_COORDINATOR_PORT"], "UNIMM_COORDINATOR_PORT")
  else:
    port = _SLURM_PORT_BASE + _int(environ, "SLURM_JOB_ID", fix, lo=0) % 2**12
  args = dict(coordinator_address=f"{hosts[0]}:{port}", num_processes=ntasks, process_id=rank)
  if ntasks == len(hosts):  # one process per node sees all the node's GPUs
    args["cluster_detection_method"] = "deactivate"
  else:  # one process per GPU, as JAX's own SLURM detection assumes
    args["local_device_ids"] = [_int(environ, "SLURM_LOCALID", fix, lo=0)]
  return args


def _tpu(environ):
  fix = "these are set by Cloud TPU / GKE; unset them when not on a TPU slice"
  names = environ.get("TPU_PROCESS_ADDRESSES") or environ.get("TPU_WORKER_HOSTNAMES") or ""
  workers = [w for w in names.split(",") if w.strip()]
  slices = _int(environ, "MEGASCALE_NUM_SLICES", fix, lo=1) if "MEGASCALE_NUM_SLICES" in environ else 1
  if "MEGASCALE_SLICE_ID" in environ:
    _rank(environ, "MEGASCALE_SLICE_ID", slices, "MEGASCALE_NUM_SLICES", fix)
  if workers and "TPU_WORKER_ID" in environ:
    _rank(environ, "TPU_WORKER_ID", len(workers), f"the {len(workers)} TPU_WORKER_HOSTNAMES", fix)
  if len(workers) == 1 and slices == 1:
    return None
  return {}


def _is_tpu(environ):
  return any(n in environ for n in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_ID",
                                    "MEGASCALE_COORDINATOR_ADDRESS", "MEGASCALE_NUM_SLICES"))


def cluster_args(environ):
  """Keyword arguments for `jax.distributed.initialize`, `{}` to let JAX detect the cluster,
  or None for a single process (also whenever UNIMM_DISTRIBUTED is not 1)."""
  flag = environ.get("UNIMM_DISTRIBUTED", "").strip()
  if flag in ("", "0"):
    return None
  if flag != "1":
    raise UserError(f"UNIMM_DISTRIBUTED={flag!r}: set it to 1 for a multi-host job, or 0")
  if any(n in environ for n in ("JAX_COORDINATOR_ADDRESS", "NNODES", "NODE_RANK")):
    return _explicit(environ)
  if "SLURM_JOB_ID" in environ:
    return _slurm(environ)
  if _is_tpu(environ):
    return _tpu(environ)
  return {}


def initialize(environ=os.environ):
  """Joins the multi-host JAX job the environment describes; True if it did, False if single-process."""
  args = cluster_args(environ)
  if args is None:
    return False
  import jax
  jax.distributed.initialize(**args)
  return True
