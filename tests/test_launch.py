"""The launch paths: each script's --dry-run commands, and unimm.distributed's reading of
SLURM, TPU / GKE and explicit multi-host variables. No cluster tools are needed (or run)."""

import json
import os
import shlex
import subprocess
import sys
import types

import pytest
import yaml

from unimm import distributed
from unimm.distributed import cluster_args, expand_nodelist
from unimm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# train arguments that need quoting: a space, both quote kinds, a shell metacharacter
ARGS = ["--config", "configs/demo.py", "--workdir", "gs://bucket/runs/a b",
        "--config.name=it's \"x\" & $HOME", "--config.mesh.fsdp=-1"]
STUB = """#!{python}
import json, os, sys
with open("{calls}", "a") as f:
  f.write(json.dumps([os.path.basename(sys.argv[0])] + sys.argv[1:]) + "\\n")
if sys.argv[1:5] == ["compute", "tpus", "tpu-vm", "describe"]:
  print("READY")
if sys.argv[0].endswith("mkdir"):  # only below TMPDIR
  [os.makedirs(d, exist_ok=True) for d in sys.argv[1:] if d.startswith(os.environ["TMPDIR"])]
"""
TOOLS = ("gcloud", "kubectl", "sbatch", "srun", "xpk", "docker", "tar", "mkdir", "fake-python")


@pytest.fixture
def launch(tmp_path):
  """Runs launch/SCRIPT with only the given variables set. The cluster tools on PATH are stubs
  that record their command lines (`gcloud ... describe` answers READY): a dry run must call none,
  and a real run (dry=False) returns the recorded commands."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
  bin_dir.mkdir()
  for tool in TOOLS:
    (bin_dir / tool).write_text(STUB.format(python=sys.executable, calls=calls))
    (bin_dir / tool).chmod(0o755)

  def run(script, *args, ok=True, dry=True, **env):
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HOME": str(tmp_path), "TMPDIR": str(tmp_path),
           "PYTHON": sys.executable, **env}
    r = subprocess.run(["bash", os.path.join(ROOT, "launch", script), *args], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=60)
    assert (r.returncode == 0) == ok, r.stdout + r.stderr
    ran = [json.loads(l) for l in calls.read_text().splitlines()] if calls.exists() else []
    if dry:
      assert not ran, ran
      return r
    calls.unlink(missing_ok=True)
    return ran
  return run


def commands(stdout, program):
  """The printed command lines that start with `program`, each split into its words."""
  return [shlex.split(line) for line in stdout.splitlines() if line.startswith(program + " ")]


def one_line_error(r, *words):
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  for w in words:
    assert w in lines[0], lines[0]


# --- unimm.distributed ------------------------------------------------------------------------

def test_single_process_unless_asked():
  slurm = dict(SLURM_JOB_ID="7", SLURM_NTASKS="4", SLURM_PROCID="1", SLURM_JOB_NODELIST="n[1-4]")
  assert cluster_args({}) is None
  assert cluster_args(slurm) is None
  assert cluster_args(dict(slurm, UNIMM_DISTRIBUTED="0")) is None
  assert cluster_args(dict(UNIMM_DISTRIBUTED="1", NNODES="1")) is None
  assert cluster_args(dict(UNIMM_DISTRIBUTED="1", SLURM_JOB_ID="7", SLURM_NTASKS="1")) is None
  assert cluster_args(dict(UNIMM_DISTRIBUTED="1")) == {}  # JAX detects the cluster itself


def test_explicit_variables():
  env = dict(UNIMM_DISTRIBUTED="1", NNODES="4", NODE_RANK="3", JAX_COORDINATOR_ADDRESS="h0:1234")
  assert cluster_args(env) == dict(coordinator_address="h0:1234", num_processes=4, process_id=3,
                                   cluster_detection_method="deactivate")
  # explicit wins over SLURM's variables (launch/gpu.sh inside an allocation)
  slurm = dict(SLURM_JOB_ID="7", SLURM_NTASKS="8", SLURM_PROCID="5", SLURM_JOB_NODELIST="n[1-8]")
  assert cluster_args(dict(env, **slurm))["process_id"] == 3


@pytest.mark.parametrize("env, words", [
    (dict(NNODES="4", NODE_RANK="4", JAX_COORDINATOR_ADDRESS="h0:1"), ["NODE_RANK=4", "NNODES=4"]),
    (dict(NNODES="four", NODE_RANK="0", JAX_COORDINATOR_ADDRESS="h0:1"), ["NNODES='four'", "integer"]),
    (dict(NNODES="2", NODE_RANK="-1", JAX_COORDINATOR_ADDRESS="h0:1"), ["NODE_RANK=-1"]),
    (dict(NNODES="2", JAX_COORDINATOR_ADDRESS="h0:1"), ["NODE_RANK is not set"]),
    (dict(NNODES="2", NODE_RANK="0"), ["JAX_COORDINATOR_ADDRESS is not set"]),
    (dict(JAX_COORDINATOR_ADDRESS="h0:1", NODE_RANK="0"), ["NNODES is not set"]),
    (dict(NNODES="2", NODE_RANK="0", JAX_COORDINATOR_ADDRESS="h0"), ["JAX_COORDINATOR_ADDRESS", "port"]),
    (dict(NNODES="2", NODE_RANK="0", JAX_COORDINATOR_ADDRESS="h0:http"), ["JAX_COORDINATOR_ADDRESS"]),
    (dict(UNIMM_DISTRIBUTED="yes"), ["UNIMM_DISTRIBUTED='yes'"]),
])
def test_bad_explicit_variables(env, words):
  with pytest.raises(UserError) as e:
    cluster_args({"UNIMM_DISTRIBUTED": "1", **env})
  assert "\n" not in str(e.value)
  for w in words:
    assert w in str(e.value)


def test_nodelist():
  assert expand_nodelist("gpu[001-004,007],login1") == [
      "gpu001", "gpu002", "gpu003", "gpu004", "gpu007", "login1"]
  assert expand_nodelist("a[8-10]") == ["a8", "a9", "a10"]
  assert expand_nodelist("r[1-2]n[1,3]") == ["r1n1", "r1n3", "r2n1", "r2n3"]
  assert expand_nodelist("node7") == ["node7"]
  for bad in ["gpu[001-004", "gpu[4-1]", "gpu[a-b]", "a,,b", "", "gpu]1["]:
    with pytest.raises(UserError, match="SLURM_STEP_NODELIST"):
      expand_nodelist(bad, "SLURM_STEP_NODELIST")


def _slurm(**env):
  return {"UNIMM_DISTRIBUTED": "1", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "6", "SLURM_PROCID": "2",
          "SLURM_LOCALID": "0", "SLURM_JOB_NODELIST": "gpu[001-004,007],login1", **env}


def test_slurm_one_process_per_node():
  assert cluster_args(_slurm(UNIMM_COORDINATOR_PORT="5555")) == dict(
      coordinator_address="gpu001:5555", num_processes=6, process_id=2,
      cluster_detection_method="deactivate")  # all the node's GPUs, not only GPU SLURM_LOCALID
  # without a port: one derived from the job id, the same for every process of the job
  a, b = (cluster_args(dict(_slurm(), SLURM_PROCID=r)) for r in ("0", "5"))
  host, port = a["coordinator_address"].split(":")
  assert a["coordinator_address"] == b["coordinator_address"] and host == "gpu001"
  assert 61440 <= int(port) <= 65535
  other = cluster_args(dict(_slurm(), SLURM_JOB_ID="4243"))["coordinator_address"]
  assert other != a["coordinator_address"]
  # the step's nodes come before the job's
  step = cluster_args(_slurm(SLURM_STEP_NODELIST="x[10-15]"))
  assert step["coordinator_address"].startswith("x10:")


def test_slurm_one_process_per_gpu():
  args = cluster_args(_slurm(SLURM_NTASKS="12", SLURM_PROCID="9", SLURM_LOCALID="1"))
  assert args["num_processes"] == 12 and args["process_id"] == 9
  assert args["local_device_ids"] == [1] and "cluster_detection_method" not in args


@pytest.mark.parametrize("env, words", [
    (dict(SLURM_JOB_NODELIST="gpu[001-004"), ["SLURM_JOB_NODELIST", "host list"]),
    (dict(SLURM_PROCID="6"), ["SLURM_PROCID=6", "SLURM_NTASKS=6"]),
    (dict(SLURM_PROCID=None), ["SLURM_PROCID is not set", "srun"]),
    (dict(SLURM_NTASKS="3"), ["SLURM_NTASKS=3", "6 hosts"]),
    (dict(UNIMM_COORDINATOR_PORT="99999"), ["UNIMM_COORDINATOR_PORT"]),
])
def test_bad_slurm_variables(env, words):
  environ = {k: v for k, v in dict(_slurm(), **env).items() if v is not None}
  with pytest.raises(UserError) as e:
    cluster_args(environ)
  assert "\n" not in str(e.value)
  for w in words:
    assert w in str(e.value)


def test_tpu_workers():
  gke = dict(UNIMM_DISTRIBUTED="1", TPU_WORKER_HOSTNAMES="w-0.js,w-1.js,w-2.js,w-3.js", TPU_WORKER_ID="2")
  assert cluster_args(gke) == {}  # JAX's TPU detection (it waits for the coordinator's DNS name)
  multislice = dict(UNIMM_DISTRIBUTED="1", TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0",
                    MEGASCALE_NUM_SLICES="2", MEGASCALE_SLICE_ID="1", MEGASCALE_COORDINATOR_ADDRESS="c")
  assert cluster_args(multislice) == {}
  single = dict(UNIMM_DISTRIBUTED="1", TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0")
  assert cluster_args(single) is None
  with pytest.raises(UserError, match="TPU_WORKER_ID=4"):
    cluster_args(dict(gke, TPU_WORKER_ID="4"))
  with pytest.raises(UserError, match="MEGASCALE_SLICE_ID=2"):
    cluster_args(dict(multislice, MEGASCALE_SLICE_ID="2"))


def test_initialize_calls_jax(monkeypatch):
  calls = []
  fake = types.SimpleNamespace(distributed=types.SimpleNamespace(initialize=lambda **kw: calls.append(kw)))
  monkeypatch.setitem(sys.modules, "jax", fake)
  assert distributed.initialize({}) is False and calls == []
  env = dict(UNIMM_DISTRIBUTED="1", NNODES="2", NODE_RANK="1", JAX_COORDINATOR_ADDRESS="h0:9")
  assert distributed.initialize(env) is True
  assert calls == [cluster_args(env)] and calls[0]["process_id"] == 1
  with pytest.raises(UserError):
    distributed.initialize(dict(env, NODE_RANK="2"))
  assert len(calls) == 1


# --- launch/gpu.sh ------------------------------------------------------------------------

def test_gpu_single_host(launch):
  r = launch("gpu.sh", *ARGS[:2], "--dry-run", *ARGS[2:])
  assert commands(r.stdout, sys.executable) == [[sys.executable, "-m", "unimm.train", *ARGS]]
  assert "UNIMM_DISTRIBUTED" not in r.stdout
  assert "export XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true" in r.stdout.splitlines()


def test_gpu_multi_host(launch):
  r = launch("gpu.sh", "--dry-run", *ARGS, NNODES="2", NODE_RANK="1", JAX_COORDINATOR_ADDRESS="h0:1234")
  assert "export UNIMM_DISTRIBUTED=1" in r.stdout.splitlines()
  assert "'coordinator_address': 'h0:1234', 'num_processes': 2, 'process_id': 1" in r.stdout
  assert commands(r.stdout, sys.executable) == [[sys.executable, "-m", "unimm.train", *ARGS]]
  bad = launch("gpu.sh", "--dry-run", *ARGS, ok=False, NNODES="2", NODE_RANK="2",
               JAX_COORDINATOR_ADDRESS="h0:1234")
  one_line_error(bad, "NODE_RANK=2", "NNODES=2")


# --- launch/slurm.sh ----------------------------------------------------------------------

def test_slurm_submit(launch):
  r = launch("slurm.sh", "--dry-run", *ARGS, NODES="4", GPUS_PER_NODE="8", PARTITION="gpu", TIME="2:00:00")
  (sbatch,) = commands(r.stdout, "sbatch")
  script = sbatch.index(os.path.join(ROOT, "launch", "slurm.sh"))
  for flag in ("--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu",
               "--time=2:00:00", f"--chdir={ROOT}"):
    assert flag in sbatch[:script]
  assert sbatch[script + 1:] == ARGS
  lines = r.stdout.splitlines()
  for env in ("UNIMM_DISTRIBUTED=1", "NCCL_DEBUG=WARN", "XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true"):
    assert f"export {env}" in lines
  (srun,) = commands(r.stdout, "srun")
  assert "--ntasks-per-node=1" in srun
  assert srun[srun.index(sys.executable):] == [sys.executable, "-m", "unimm.train", *ARGS]


def test_slurm_in_job(launch):
  r = launch("slurm.sh", "--dry-run", *ARGS, SLURM_JOB_ID="11", UNIMM_DIR=ROOT, NCCL_DEBUG="INFO")
  assert commands(r.stdout, "sbatch") == []
  assert "export NCCL_DEBUG=INFO" in r.stdout.splitlines()
  (srun,) = commands(r.stdout, "srun")
  assert srun[-len(ARGS):] == ARGS


def test_slurm_in_job_runs_a_spool_copy(tmp_path):
  """sbatch runs a copy of the script from its spool directory: the helpers come from UNIMM_DIR."""
  spool = tmp_path / "slurmd" / "job11" / "slurm_script"
  spool.parent.mkdir(parents=True)
  spool.write_text(open(os.path.join(ROOT, "launch", "slurm.sh")).read())
  env = dict(os.environ, SLURM_JOB_ID="11", UNIMM_DIR=ROOT, PYTHON=sys.executable)
  r = subprocess.run(["bash", str(spool), "--dry-run", *ARGS], capture_output=True, text=True,
                     env=env, cwd=str(tmp_path), timeout=60)
  assert r.returncode == 0, r.stderr
  (srun,) = commands(r.stdout, "srun")
  assert srun[-len(ARGS):] == ARGS


# --- launch/tpu_pod.sh --------------------------------------------------------------------

TPU = dict(TPU_NAME="my-pod", ZONE="us-east5-a", PROJECT="proj", ACCELERATOR="v5p-64")


def _remote_train_args(ssh):
  remote = next(a for a in ssh if a.startswith("--command="))[len("--command="):]
  words = shlex.split(remote)
  start = words.index("unimm.train") + 1
  return remote, words[start:words.index("2>&1")]


def test_tpu_pod_create_and_run(launch):
  r = launch("tpu_pod.sh", "--create", "--spot", "--dry-run", *ARGS, **TPU)
  gcloud = commands(r.stdout, "gcloud")
  create = gcloud[0]
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"] and create[5] == "my-pod"
  for flag in ("--zone=us-east5-a", "--project=proj", "--accelerator-type=v5p-64",
               "--version=v2-alpha-tpuv5", "--spot"):
    assert flag in create
  (scp_code,) = [c for c in gcloud if "scp" in c and "--worker=all" in c]
  assert "my-pod:unimm_src.tgz" in scp_code
  (ssh,) = [c for c in gcloud if "ssh" in c]
  assert ssh[5] == "my-pod" and "--worker=all" in ssh and "--zone=us-east5-a" in ssh
  remote, train = _remote_train_args(ssh)
  assert train == ARGS
  assert "UNIMM_DISTRIBUTED=1 " in remote and "pip install -q -e '.[tpu]'" in remote
  # v5p-64: 64 TensorCores, 32 chips, 8 hosts: one log each
  logs = [c for c in gcloud if "scp" in c and c[5].startswith("my-pod:")]
  assert [c[6] for c in logs] == [f"runs/logs/my-pod/worker-{w}.log" for w in range(8)]
  assert [c[7] for c in logs] == [f"--worker={w}" for w in range(8)]


def test_tpu_pod_queued_and_reuse(launch):
  r = launch("tpu_pod.sh", "--create", "--queued", "--dry-run", *ARGS, **dict(TPU, ACCELERATOR="v6e-16"))
  create = commands(r.stdout, "gcloud")[0]
  assert create[3:6] == ["queued-resources", "create", "my-pod"]
  assert "--node-id=my-pod" in create and "--accelerator-type=v6e-16" in create
  assert "--runtime-version=v2-alpha-tpuv6e" in create and "--spot" not in create
  assert "queued-resources describe my-pod" in r.stdout
  assert len([c for c in commands(r.stdout, "gcloud") if "--worker=3" in c]) == 1  # 4 hosts
  reuse = launch("tpu_pod.sh", "--dry-run", *ARGS, TPU_NAME="old", ZONE="z", WORKERS="2")
  gcloud = commands(reuse.stdout, "gcloud")
  assert not any("create" in c for c in gcloud)
  assert "tpu-vm describe old" in reuse.stdout
  assert len([c for c in gcloud if c[5] == "old:unimm/train.log"]) == 2


def test_tpu_pod_errors(launch):
  one_line_error(launch("tpu_pod.sh", "--dry-run", *ARGS, ok=False, ZONE="z", ACCELERATOR="v5p-8"),
                 "TPU_NAME")
  local = ["--config", "configs/demo.py", "--workdir", "runs/x"]
  one_line_error(launch("tpu_pod.sh", "--dry-run", *local, ok=False, **TPU), "gs://")
  one_line_error(launch("tpu_pod.sh", "--create", "--dry-run", *ARGS, ok=False, TPU_NAME="a", ZONE="z",
                        WORKERS="2"), "ACCELERATOR")
  launch("tpu_pod.sh", "--dry-run", *local, **dict(TPU, ACCELERATOR="v5p-8"))  # one host: any disk


# --- launch/gke.sh ------------------------------------------------------------------------

def _manifest(stdout):
  lines = stdout.splitlines()
  start = next(i for i, l in enumerate(lines) if l.startswith("# manifest "))
  return yaml.safe_load("\n".join(lines[start + 1:lines.index("# ---")]))


def test_gke_jobset(launch):
  r = launch("gke.sh", "--dry-run", *ARGS, IMAGE="reg/unimm:v1", TPU_TYPE="v5p-64", JOB_NAME="run-1")
  m = _manifest(r.stdout)
  assert m["kind"] == "JobSet" and m["metadata"]["name"] == "run-1"
  job = m["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == job["completions"] == 8
  pod = job["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "2x4x4"}
  (c,) = pod["containers"]
  assert c["image"] == "reg/unimm:v1" and c["resources"]["limits"]["google.com/tpu"] == 4
  assert c["command"] + c["args"] == ["python3", "-m", "unimm.train", *ARGS]
  assert {"name": "UNIMM_DISTRIBUTED", "value": "1"} in c["env"]
  assert commands(r.stdout, "kubectl") == [["kubectl", "apply", "-f", "runs/gke/run-1.yaml"]]
  xpk = shlex.split(next(l for l in r.stdout.splitlines() if "xpk workload create" in l).split(": ", 1)[1])
  assert "--tpu-type=v5p-64" in xpk and "--workload=run-1" in xpk
  command = next(a for a in xpk if a.startswith("--command="))
  assert "UNIMM_DISTRIBUTED=1 python3 -m unimm.train" in command
  assert shlex.split(command.split("unimm.train", 1)[1]) == ARGS


def test_gke_sizes_build_and_xpk(launch):
  m = _manifest(launch("gke.sh", "--dry-run", *ARGS, IMAGE="i", TPU_TYPE="v6e-16", JOB_NAME="a").stdout)
  job = m["spec"]["replicatedJobs"][0]["template"]["spec"]
  pod = job["template"]["spec"]
  assert job["parallelism"] == 4 and pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "4x4"
  assert pod["nodeSelector"]["cloud.google.com/gke-tpu-accelerator"] == "tpu-v6e-slice"
  m = _manifest(launch("gke.sh", "--dry-run", *ARGS, IMAGE="i", TPU_TYPE="v5litepod-8", JOB_NAME="a").stdout)
  job = m["spec"]["replicatedJobs"][0]["template"]["spec"]
  assert job["parallelism"] == 1
  assert job["template"]["spec"]["containers"][0]["resources"]["limits"]["google.com/tpu"] == 8
  r = launch("gke.sh", "--build", "--xpk", "--dry-run", *ARGS, IMAGE="reg/u:1", JOB_NAME="b",
             CLUSTER="c1", NUM_SLICES="2", ZONE="us-east5-a")
  build, push = commands(r.stdout, "docker")
  assert build[:4] == ["docker", "build", "-t", "reg/u:1"] and build[4].endswith("/unimm_image_b")
  assert push == ["docker", "push", "reg/u:1"] and "FROM python:3.11-slim" in r.stdout
  (xpk,) = commands(r.stdout, "xpk")
  assert "--cluster=c1" in xpk and "--num-slices=2" in xpk and "--docker-image=reg/u:1" in xpk
  assert commands(r.stdout, "kubectl") == []


def test_gke_errors(launch):
  one_line_error(launch("gke.sh", "--dry-run", *ARGS, ok=False), "IMAGE")
  one_line_error(launch("gke.sh", "--dry-run", "--workdir", "runs/x", ok=False, IMAGE="i"), "gs://")
  one_line_error(launch("gke.sh", "--dry-run", *ARGS, ok=False, IMAGE="i", JOB_NAME="Bad_Name"), "JOB_NAME")
  one_line_error(launch("gke.sh", "--dry-run", *ARGS, ok=False, IMAGE="i", TPU_TYPE="v5p-48"), "TOPOLOGY")
  one_line_error(launch("gke.sh", "--xpk", "--dry-run", *ARGS, ok=False, IMAGE="i"), "CLUSTER")


# --- what a dry run prints is what a real run runs ------------------------------------------

def _printed(stdout):
  """The command lines a dry run printed (not its comments, exports or manifest)."""
  programs = {t for t in TOOLS} | {sys.executable}
  return [shlex.split(l) for l in stdout.splitlines() if l.split(" ", 1)[0] in programs]


@pytest.mark.parametrize("script, flags, env", [
    ("tpu_pod.sh", ["--create", "--spot"], TPU),
    ("tpu_pod.sh", [], dict(TPU, ACCELERATOR="v4-16")),
    ("slurm.sh", [], dict(NODES="3")),
    ("gke.sh", ["--build"], dict(IMAGE="reg/u:1", JOB_NAME="same")),
    ("gke.sh", ["--xpk"], dict(IMAGE="reg/u:1", JOB_NAME="same", CLUSTER="c")),
])
def test_dry_run_is_the_real_run(launch, tmp_path, script, flags, env):
  env = dict(env, LOG_DIR=str(tmp_path / "logs"), OUT_DIR=str(tmp_path / "gke"))
  out = launch(script, *flags, "--dry-run", *ARGS, **env).stdout
  printed = _printed(out.split("# in the job:")[0])  # slurm.sh: what sbatch will run is not run here
  ran = launch(script, *flags, *ARGS, dry=False, **env)
  assert [c[1:] for c in ran] == [c[1:] for c in printed] and printed
  assert [c[0] for c in ran] == [os.path.basename(c[0]) for c in printed]


def test_gpu_dry_run_is_the_real_run(launch, tmp_path):
  env = dict(NNODES="2", NODE_RANK="0", JAX_COORDINATOR_ADDRESS="h:1")
  printed = launch("gpu.sh", "--dry-run", *ARGS, **env).stdout.splitlines()
  ran = launch("gpu.sh", *ARGS, dry=False, PYTHON=str(tmp_path / "bin" / "fake-python"), **env)
  assert ran[-1][1:] == shlex.split(printed[-1])[1:] == ["-m", "unimm.train", *ARGS]


# --- launch/local.sh ------------------------------------------------------------------------

def test_local_processes(launch):
  """N processes of this machine joined by a localhost coordinator (tests/test_multihost.py runs
  them): process i gets the explicit variables with NODE_RANK=i and D CPU devices."""
  r = launch("local.sh", "--processes", "3", "--devices", "2", "--port", "4321", "--python",
             sys.executable, "--logdir", "runs/l", "--dry-run", "--", *ARGS)
  lines = r.stdout.splitlines()
  assert len(lines) == 4 and lines[-1] == "wait"
  for i, line in enumerate(lines[:3]):
    words = shlex.split(line)
    assert words[:4] == ["cd", ROOT, "&&", "env"] and words[-1] == "&"
    env = dict(w.split("=", 1) for w in words[4:words.index(sys.executable)])
    assert env["UNIMM_DISTRIBUTED"] == "1" and env["NODE_RANK"] == str(i)
    assert env["NNODES"] == "3" and env["JAX_COORDINATOR_ADDRESS"] == "localhost:4321"
    assert env["XLA_FLAGS"].endswith("--xla_force_host_platform_device_count=2")
    assert cluster_args(env) == dict(coordinator_address="localhost:4321", num_processes=3,
                                     process_id=i, cluster_detection_method="deactivate")
    train = words[words.index(sys.executable) + 1:-1]
    assert train[:2] == ["-m", "unimm.train"]
    assert train[2:] == (ARGS if i == 0 else ARGS + [">", f"runs/l/process_{i}.log", "2>&1"])
  bad = launch("local.sh", "--processes", "two", "--dry-run", "--", *ARGS, ok=False)
  one_line_error(bad, "--processes", "two")
