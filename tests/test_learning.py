"""Learning is tested: a tiny model trained for 700 steps on Shapes (word tokens) must
read images far better than chance (ShapesEval captions) and draw the asked-for colour
more often than chance.

It trains in a process of its own with XLA's default optimisation: it runs far more than it
compiles, unlike the rest of the suite (tests/conftest.py compiles without backend
optimisations)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_tiny_model_learns_shapes(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  r = subprocess.run([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=900)
  assert r.returncode == 0, r.stderr[-3000:]
  scores = json.loads(r.stdout.strip().splitlines()[-1])
  print({k: round(v, 3) for k, v in scores.items() if not k.startswith("oracle")})
  assert scores["caption/color"] >= scores["chance/caption/color"] + 0.25
  assert scores["caption/attribute"] >= scores["chance/caption/attribute"] + 0.1
  assert scores["t2i_single/color"] >= scores["chance/t2i_single/color"] + 0.2


def train_and_score(workdir):
  """ShapesEval scores of the tiny model after 700 steps in `workdir` (word tokens: captions
  are learned in far fewer steps than over bytes; at 500 steps it is still at chance)."""
  import jax
  from unimm.eval.shapes_eval import ShapesEval
  from unimm.sample import sampler_from_run
  from unimm.train.loop import Run
  from tests.helpers import tiny_config
  cfg = tiny_config(**{
      "model.width": 64, "model.depth": 2, "model.heads": 2, "model.mlp_dim": 192,
      "data.batch_size": 8, "data.seq_len": 64, "data.two_object_prob": 0.0,
      "data.tokenizer": "shapes",
      "data.tasks": {"t2i": 0.6, "caption": 0.4},
      "train.steps": 700, "train.log_every": 700, "train.ckpt_every": 10_000,
      "optim.warmup_steps": 30, "flow.loss_weight": 3.0, "sample.cfg_scale": 4.0,
      "sample.steps": 10, "sample.max_new_tokens": 32})
  run = Run(cfg, workdir, devices=jax.devices()[:1])
  state = run.train(run.restore_or_init(), log=lambda *_: None)
  sampler = sampler_from_run(run, state)
  bench = ShapesEval(seed=7, image_size=16, n_single=27, n_double=1, n_caption=27, n_qa=1, n_edit=1)
  return bench.run(generate=lambda p: sampler.text_to_image(p, seed=0),
                   caption=lambda im: sampler.image_to_text(im))


if __name__ == "__main__":
  print(json.dumps({k: float(v) for k, v in train_and_score(sys.argv[1]).items()}))
