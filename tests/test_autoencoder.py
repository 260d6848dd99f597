"""Image-tokenizer training (unimm.train.autoencoder) on tiny configs."""

import json
import os
import sys

import jax
import pytest

from unimm.errors import UserError
from unimm.train import autoencoder as ae


def tiny(kind="vae", quantizer="vq", steps=8):
  c = ae.default_config()
  c.data.update(image_size=16, batch_size=4)
  c.train.update(steps=steps, log_every=1, ckpt_every=100)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.mesh.data = 1
  c.tokenizer.update(kind=kind, quantizer=quantizer, block_out_channels=(8, 16),
                     norm_num_groups=4, num_codes=64, code_dim=4, fsq_levels=(4, 4, 4),
                     eval_images=4, dead_code_threshold=0.5)
  return c


def _train(cfg, workdir, lines=None):
  log = (lambda s: lines.append(s)) if lines is not None else (lambda s: None)
  return ae.train(cfg, str(workdir), devices=jax.devices()[:1], log=log)


def _metrics(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.parametrize("kind,quantizer", [("vae", "vq"), ("vq", "vq"), ("vq", "fsq")])
def test_training_reduces_reconstruction_and_writes_eval(tmp_path, kind, quantizer):
  _, result = _train(tiny(kind, quantizer), tmp_path)
  m = _metrics(tmp_path)
  assert [r["step"] for r in m] == list(range(1, 9))
  assert m[-1]["rec"] < 0.8 * m[0]["rec"]
  assert ("kl" in m[0]) == (kind == "vae")
  saved = json.load(open(tmp_path / "eval.json"))
  assert saved == result and saved["step"] == 8 and saved["psnr"] > 0
  if kind == "vq":
    for k in ("usage", "perplexity", "quantizer_loss"):
      assert k in m[-1]
    assert 0 < saved["usage"] <= 1 and saved["perplexity"] >= 1
    assert saved["num_codes"] == 64  # 64 codes, or FSQ levels 4 x 4 x 4
  assert os.listdir(tmp_path / "tb") and os.listdir(tmp_path / "checkpoints")


def test_restart_continues_from_the_saved_step(tmp_path):
  cfg = tiny("vq", "vq", steps=3)
  state, _ = _train(cfg, tmp_path)
  cfg.train.steps = 5
  lines = []
  state2, result = _train(cfg, tmp_path, lines)
  assert lines[0].startswith("step 3 of 5")
  assert [r["step"] for r in _metrics(tmp_path)] == [1, 2, 3, 4, 5]
  assert int(state2["step"]) == 5 and result["step"] == 5


@pytest.mark.parametrize("flag,word", [("--config.tokenizer.kind=gan", "tokenizer.kind"),
                                       ("--config.tokenizer.quantizer=rvq", "tokenizer.quantizer")])
def test_bad_config_is_one_line(tmp_path, capsys, monkeypatch, flag, word):
  extra = ["--config.tokenizer.kind=vq"] if "quantizer" in flag else []
  monkeypatch.setattr(sys, "argv", ["autoencoder", "--workdir", str(tmp_path), *extra, flag])
  with pytest.raises(SystemExit) as e:
    ae.cli(ae.main)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and word in err and "\n" not in err


def test_unknown_kind_raises_before_building():
  with pytest.raises(UserError, match="tokenizer.kind"):
    ae.check_config(tiny(kind="gan"))
