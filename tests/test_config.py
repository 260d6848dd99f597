"""Configs: typed dotted overrides, and one-line errors from the entry points."""

import os
import subprocess
import sys

import pytest

from unimm.config import defaults, load_file, override, parse_args
from unimm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_are_typed_by_the_field():
  c = defaults()
  override(c, "train.steps", "300")
  override(c, "optim.lr", "1")
  override(c, "model.prediction", "velocity")
  override(c, "mesh.rules", "(('batch', 'data'),)")
  assert c.train.steps == 300 and isinstance(c.optim.lr, float) and c.optim.lr == 1.0
  assert c.model.prediction == "velocity" and c.mesh.rules == (("batch", "data"),)


def test_typo_names_the_nearest_keys():
  with pytest.raises(UserError, match=r"unknown config key 'train.setps'.*train.steps"):
    override(defaults(), "train.setps", "3")
  with pytest.raises(UserError, match="expected a int"):
    override(defaults(), "train.steps", "'many'")


def test_parse_args_reads_recipe_and_flags():
  cfg, opts = parse_args(["--config", os.path.join(ROOT, "configs/demo.py"),
                          "--config.train.steps=7", "--workdir", "w", "--resume"])
  assert cfg.train.steps == 7 and opts == {"workdir": "w", "resume": True}
  with pytest.raises(UserError, match="unknown flag '--wrkdir'"):
    parse_args(["--config", os.path.join(ROOT, "configs/demo.py"), "--wrkdir", "w"])


def test_every_recipe_loads():
  for name in os.listdir(os.path.join(ROOT, "configs")):
    if name.endswith(".py") and not name.startswith("_"):
      assert load_file(os.path.join(ROOT, "configs", name)).train.steps > 0


def _train_cli(tmp_path, *args):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", PYTHONPATH=ROOT)
  return subprocess.run(
      [sys.executable, "-m", "unimm.train", "--config", os.path.join(ROOT, "configs/demo.py"),
       "--workdir", str(tmp_path / "w"), *args],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("args, says", [
    (["--config.train.setps=3"], "did you mean train.steps"),
    (["--config.mesh.data=3"], "mesh"),
    (["--config.data.tokenizer=/nonexistent/tok"], "data.tokenizer"),
    (["--config.data.batch_size=12", "--config.mesh.data=8"], "data.batch_size"),
])
def test_cli_errors_are_one_line(tmp_path, args, says):
  r = _train_cli(tmp_path, *args)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and says in lines[0], r.stderr[-2000:]
  assert "Traceback" not in r.stderr


def test_saved_config_gains_new_fields_with_defaults():
  from unimm.config import from_saved
  saved = defaults().to_dict()
  del saved["model"]["image_rope_2d"]  # a field added after the run was saved
  saved["model"]["width"] = 64
  saved["data"]["tasks"] = {"t2i": 1.0}
  cfg = from_saved(saved)
  assert cfg.model.width == 64 and cfg.model.image_rope_2d is False
  assert dict(cfg.data.tasks) == {"t2i": 1.0}
