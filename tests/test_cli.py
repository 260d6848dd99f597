"""The entry points end to end on a tiny config: train, evaluate, sample (resume:
tests/test_multihost.py)."""

import json
import os
import subprocess
import sys

import pytest

from unimm.eval.shapes_eval import SCORE_KEYS
from tests.helpers import QUICK_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.width=32", "--config.model.depth=1", "--config.model.heads=2",
        "--config.model.mlp_dim=64", "--config.data.image_size=16", "--config.data.batch_size=2",
        "--config.sample.steps=2", "--config.sample.max_new_tokens=6", "--config.eval.n_single=2",
        "--config.eval.n_double=1", "--config.eval.n_caption=2", "--config.eval.n_qa=1",
        "--config.eval.n_edit=1", "--config.mesh.data=1"]


# one device, and (as in conftest.py) compiles without XLA:CPU's backend optimisations
XLA_FLAGS = f"--xla_force_host_platform_device_count=1 {QUICK_XLA_FLAGS}"


def _run(*args):
  # (and most XLA optimisations off: these runs compile far more than they run)
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=XLA_FLAGS, JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  r = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, env=env,
                     cwd=ROOT, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


@pytest.mark.slow
def test_train_eval_sample(tmp_path):
  work = str(tmp_path / "run")
  r = _run("unimm.train", "--config", "configs/demo.py", "--workdir", work,
           "--config.train.steps=3", *TINY)
  assert "ShapesEval" in r.stdout
  scores = json.load(open(os.path.join(work, "eval.json")))
  for k in SCORE_KEYS:
    assert 0.0 <= scores[k] <= 1.0 and f"chance/{k}" in scores
  assert os.path.getsize(os.path.join(work, "samples.png")) > 0
  metrics = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))]
  assert metrics[-1]["step"] == 3
  assert os.listdir(os.path.join(work, "tb"))

  out = str(tmp_path / "gen.png")
  _run("unimm.sample", "--workdir", work, "--mode", "t2i", "--prompt", "a red circle at the top left",
       "--out", out)
  from PIL import Image
  assert Image.open(out).size == (16, 16)
  # the run as a curation judge: caption scores, a recaption per pair, the one-line summary
  from unimm.data import curate
  curate.corrupt(str(tmp_path / "pairs"), n=6, rate=0.0, image_size=16)
  r = _run("unimm.data.curate", "--input", str(tmp_path / "pairs"), "--output",
           str(tmp_path / "judged"), "--judge", work, "--min-caption-score", "-1000", "--recaption")
  assert json.loads(r.stdout.strip().splitlines()[-1])["written"] == 6
  rows = curate.measure_captions(str(tmp_path / "judged"))
  assert rows["documents"] == 6 and rows["original/exact"] == 1.0
  # (--resume from the CLI: tests/test_multihost.py continues a run in the same workdir)


@pytest.mark.slow
def test_convert_then_train_on_a_mixture(tmp_path):
  """Requirement of the data issue: write public-format files, convert them,
  train the demo config on Shapes mixed with both converted sources, resume
  with a different worker count (a one-line error), then with the same one."""
  raw_pairs, raw_edits = str(tmp_path / "raw" / "00000.parquet"), str(tmp_path / "e.parquet")
  pairs, edits = str(tmp_path / "pairs"), str(tmp_path / "edits")
  _run("unimm.data.fixtures", "--format", "webdataset", "--output",
       raw_pairs.replace(".parquet", ".tar"), "--n", "40", "--image-size", "24")
  r = _run("unimm.data.convert", "--format", "webdataset", "--input", str(tmp_path / "raw"),
           "--output", pairs)
  assert json.loads(r.stdout.strip().splitlines()[-1])["documents"] == 40
  _run("unimm.data.fixtures", "--format", "instructpix2pix", "--output", raw_edits, "--n", "20")
  r = _run("unimm.data.convert", "--format", "instructpix2pix", "--input", raw_edits,
           "--output", edits)
  assert json.loads(r.stdout.strip().splitlines()[-1]) == {
      "documents": 20, "images": 40, "skipped": {}, "repaired": {}}
  work = str(tmp_path / "run")
  mix = [f"--config.data.mixture=shapes:2,{pairs}:1,{edits}:1", "--config.data.max_aspect=2",
         "--config.train.log_every=1", "--no_eval"]
  r = _run("unimm.train", "--config", "configs/demo.py", "--workdir", work,
           "--config.train.steps=3", *mix, *TINY)
  assert "data source 'pairs' (25% of records): " in r.stdout
  assert "40 documents with 40 images converted from webdataset" in r.stdout
  last = [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))][-1]
  assert last["step"] == 3 and last["data/read/pairs"] > 0 and last["data/read/edits"] > 0
  assert last["data/read/shapes"] > 0
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=XLA_FLAGS)
  bad = subprocess.run([sys.executable, "-m", "unimm.train", "--config", "configs/demo.py",
                        "--workdir", work, "--config.train.steps=4", "--config.data.num_workers=1",
                        *mix, *TINY], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=600)
  assert bad.returncode == 2 and "Traceback" not in bad.stderr
  assert bad.stderr.strip().splitlines()[-1].startswith("error: the checkpoint's data stream was "
                                                         "saved with data.num_workers=0")
  _run("unimm.train", "--config", "configs/demo.py", "--workdir", work, "--config.train.steps=5",
       *mix, *TINY)
  assert [json.loads(l) for l in open(os.path.join(work, "metrics.jsonl"))][-1]["step"] == 5
