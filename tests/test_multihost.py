"""Multi-host runs on this machine: 2 and 4 JAX processes (CPU devices, a localhost coordinator,
launch/local.sh) train the demo config from the CLI and match one process on the same global
batches; a checkpoint written by 2 processes restores in 1 process on another mesh and in 4.

data.shards=4 makes the global batches the same for 1, 2 and 4 processes (each reads its
shards' rows; tests/test_pipeline.py checks that the shards read disjoint records)."""

import json
import os
import shutil
import socket
import subprocess

import jax
import numpy as np
import pytest

from unimm.config import parse_args
from unimm.train.loop import Run
from tests.helpers import QUICK_XLA_FLAGS, quick_compiles

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config", "configs/demo.py", "--config.model.width=32", "--config.model.depth=1",
        "--config.model.heads=2", "--config.model.mlp_dim=64", "--config.data.image_size=16",
        "--config.data.batch_size=4", "--config.data.shards=4", "--config.mesh.data=-1",
        "--config.train.log_every=1", "--config.train.ckpt_every=2"]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(processes, devices, workdir, steps, logdir, *more):
  """`python -m unimm.train ... *more` as `processes` JAX processes of `devices` CPU devices
  each; its metrics by step."""
  # most XLA optimisations off, as in this process (_train_here): these runs compile far more
  # than they run
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=QUICK_XLA_FLAGS,
             JAX_DISABLE_MOST_OPTIMIZATIONS="1", UNIMM_COORDINATOR_PORT=str(_free_port()))
  r = subprocess.run(
      ["bash", "launch/local.sh", "--processes", str(processes), "--devices", str(devices),
       "--logdir", str(logdir), "--", *ARGS, "--workdir", str(workdir),
       f"--config.train.steps={steps}", "--no_eval", *more],
      env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
  others = "".join(p.read_text()[-1500:] for p in sorted(logdir.glob("process_*.log")))
  assert r.returncode == 0, r.stderr[-3000:] + others
  assert f"{processes} process(es)" in r.stdout
  return r.stdout, _metrics(workdir)


def _metrics(workdir):
  return {m["step"]: m for m in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))}


def _train_here(workdir, steps, devices, *overrides):
  """The same run in this (one) process on `devices` of its CPU devices."""
  cfg, _ = parse_args([*ARGS, f"--config.train.steps={steps}", *overrides])
  with quick_compiles():
    run = Run(cfg, str(workdir), devices=jax.devices()[:devices])
    run.train(run.restore_or_init(), log=lambda *_: None)
    run.ckpt.close()
  return _metrics(workdir)


def _same(a, b):
  np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
  assert a["data/read/shapes"] == b["data/read/shapes"]


@pytest.mark.slow
def test_two_and_four_processes_match_one(tmp_path):
  one = _train_here(tmp_path / "one", 2, 4)  # data=4 over 4 devices of one process
  _, two = _launch(2, 2, tmp_path / "two", 2, tmp_path / "logs2")
  assert set(two) == {1, 2}
  for step in (1, 2):
    _same(two[step], one[step])
  # the 2-process checkpoint at step 2, continued to step 3 in one process on another mesh
  # (2 devices, fsdp) and in 4 processes of one device each
  for name in ("in_one", "in_four"):
    shutil.copytree(tmp_path / "two", tmp_path / name)
  in_one = _train_here(tmp_path / "in_one", 3, 2, "--config.mesh.data=1", "--config.mesh.fsdp=2")
  out, in_four = _launch(4, 1, tmp_path / "in_four", 3, tmp_path / "logs4", "--resume")
  assert "step 2 of 3" in out and sorted(in_four) == [1, 2, 3]  # resumed: one more line
  assert in_one[3]["data/read/shapes"] > two[2]["data/read/shapes"]
  _same(in_four[3], in_one[3])
