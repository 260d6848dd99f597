"""Bad files given to each entry point: one `error: ...` line on stderr naming the file and
the problem, exit status 2, no traceback; valid but unusual images are converted to 8-bit RGB
and said so. Safe loading: only safetensors weights are read, tokenizer folders never run
their own code, the hub libraries stay offline.

The entry points run in-process through `unimm.errors.cli` (one real subprocess checks the
whole path of `python -m unimm.sample`); every input is checked before a model is built,
so nothing here compiles. (A folder of bad images given to `unimm.tokenize`, whose images
are skipped and counted: tests/test_tokenize.py.)"""

import importlib
import os
import shutil
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest

import unimm
from unimm import sample, tokenize
from unimm.data import fixtures, records
from unimm.data.pipeline import make_sources
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError, cli
from unimm.interop import diffusers_mmdit, diffusers_vae, hf_llm
from unimm.train import __main__ as train

from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
TINY = ["--config.model.width=32", "--config.model.depth=1", "--config.model.heads=2",
        "--config.model.mlp_dim=64", "--config.data.image_size=16", "--config.data.batch_size=8",
        "--config.mesh.data=-1"]  # (conftest: 8 CPU devices)
BAD = {"empty_image": "empty.png", "undecodable_image": "not_an_image.png",
       "truncated_image": "truncated.jpg", "decompression_bomb": "bomb.png"}
UNUSUAL = {"16bit_image": "gray16.png", "cmyk_image": "cmyk.jpg",
           "palette_image": "palette.png", "alpha_image": "alpha.png", "rgb16": "rgb16.png"}
PROBLEM = {"empty_image": "is empty (0 bytes)", "undecodable_image": "is not an image",
           "truncated_image": "is truncated or corrupt",
           "decompression_bomb": "is a decompression bomb"}


def _png_rgb16(h=4, w=6):
  """A 16-bit-per-channel RGB PNG (Pillow writes none), written chunk by chunk."""
  row = np.linspace(0, 65535, w * 3).astype(">u2").tobytes()

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"".join(b"\0" + row for _ in range(h))))
          + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  """A folder of broken and unusual images (`fixtures.bad_images` and a 16-bit RGB PNG):
  reason -> path."""
  root = tmp_path_factory.mktemp("images")
  data = dict(fixtures.bad_images(), rgb16=_png_rgb16())
  out = {}
  for reason, name in {**BAD, **UNUSUAL}.items():
    out[reason] = str(root / name)
    with open(out[reason], "wb") as f:
      f.write(data[reason])
  return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A training workdir with its config.json and no checkpoint."""
  path = tmp_path_factory.mktemp("run")
  (path / "config.json").write_text(tiny_config().to_json())
  return str(path)


def run_cli(main, argv, capsys, monkeypatch):
  """Runs an entry point as `python -m` does (through `cli`); returns its stderr lines, after
  checking the exit status 2 and that the last line is the only `error:` line."""
  monkeypatch.setattr(sys, "argv", ["unimm", *argv])
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:
    cli(main)
  err = capsys.readouterr().err
  assert e.value.code == 2, err
  lines = err.strip().splitlines()
  assert lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
  assert sum(l.startswith("error:") for l in lines) == 1, err
  print(err)
  return lines


def one_error(main, argv, capsys, monkeypatch, *words):
  """run_cli expecting exactly one stderr line, the error, holding each of `words`."""
  lines = run_cli(main, argv, capsys, monkeypatch)
  assert len(lines) == 1, lines
  for w in words:
    assert w in lines[0], lines[0]
  return lines[0]


# ------------------------------------------------------------------ images


@pytest.mark.parametrize("reason", list(BAD))
def test_sample_bad_image(reason, images, workdir, capsys, monkeypatch):
  one_error(sample.main, ["--workdir", workdir, "--mode", "caption", "--image", images[reason]],
            capsys, monkeypatch, images[reason], PROBLEM[reason])


@pytest.mark.parametrize("reason", [r for r in UNUSUAL if r != "rgb16"])
def test_sample_converts_unusual_images_and_says_so(reason, images, workdir, capsys,
                                                    monkeypatch):
  """The image is accepted (one note line); the run then stops at the missing checkpoint."""
  lines = run_cli(sample.main, ["--workdir", workdir, "--mode", "answer", "--image",
                                images[reason]], capsys, monkeypatch)
  assert len(lines) == 2, lines
  assert lines[0] == records.repair_note("--image", images[reason], reason)
  assert "holds no checkpoint" in lines[1]


@pytest.mark.parametrize("reason", list(UNUSUAL))
def test_unusual_images_become_8bit_rgb(reason, images):
  image, repair = records.image_file(images[reason], "--image", size=(8, 8))
  assert image.shape == (8, 8, 3) and image.dtype == np.uint8
  assert repair == (None if reason == "rgb16" else reason)  # PIL reads 16-bit RGB as 8-bit


@pytest.mark.parametrize("reason", list(BAD))
def test_tokenize_bad_input_file(reason, images, tmp_path, capsys, monkeypatch):
  """Checked before the tokenizer workdir is read (here an empty folder)."""
  one_error(tokenize.main, ["encode", "--tokenizer", str(tmp_path), "--input", images[reason],
                            "--output", str(tmp_path / "out")],
            capsys, monkeypatch, f"--input {images[reason]}", PROBLEM[reason])
  assert not os.path.exists(tmp_path / "out")


def test_tokenize_broken_tokenizer_workdir(tmp_path, capsys, monkeypatch):
  (tmp_path / "config.json").write_text('{"tokenizer": ')
  one_error(tokenize.main, ["encode", "--tokenizer", str(tmp_path), "--input", "shapes",
                            "--output", str(tmp_path / "out")],
            capsys, monkeypatch, str(tmp_path / "config.json"), "not readable JSON")


def test_sample_subprocess_zero_byte_image(images, workdir):
  """The whole path of `python -m unimm.sample`: no traceback, one line, exit status 2."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  p = subprocess.run([sys.executable, "-m", "unimm.sample", "--workdir", workdir, "--mode",
                      "caption", "--image", images["empty_image"]],
                     capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert p.returncode == 2 and p.stdout == "", p.stderr
  assert p.stderr == f"error: --image {images['empty_image']} is empty (0 bytes): give a PNG, " \
                     "JPEG, WebP, BMP or TIFF image\n"


# ------------------------------------------------------------- sample's workdir


def test_sample_workdirs(tmp_path, capsys, monkeypatch):
  def err(workdir, *words, argv=("--mode", "t2i")):
    return one_error(sample.main, ["--workdir", str(workdir), *argv], capsys, monkeypatch, *words)
  config = tmp_path / "config.json"
  err(tmp_path / "none", f"{tmp_path / 'none'}", "config.json not found: pass --config")
  err(tmp_path / "none", f"--workdir {tmp_path / 'none'} does not exist",
      argv=("--config", DEMO, "--mode", "t2i"))
  config.write_text("{not json")
  err(tmp_path, f"{config} is not readable JSON")
  config.write_text("[1, 2]")
  err(tmp_path, f"{config} holds a JSON list, not a config written by python -m unimm.train")
  config.write_text(tiny_config().to_json())
  (tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1").mkdir(parents=True)  # a cut-short save
  err(tmp_path, f"--workdir {tmp_path} holds no checkpoint")


# -------------------------------------------------- converted folders, train


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """name -> a converted folder broken in one way (and "good")."""
  root = tmp_path_factory.mktemp("converted")
  good = str(root / "good")
  w = records.ShardWriter(good, docs_per_shard=1)
  for png, caption in fixtures.shapes_pairs(2, image_size=16):
    w.write({"task": "t2i", "segments": [{"kind": "text", "text": caption, "loss": False},
                                          {"kind": "image", "bytes": png, "role": "target"}]})
  w.close({"format": "test", "documents": 2})
  shard = "docs-00001.array_record"

  def cut(path):
    data = open(path, "rb").read()
    with open(path, "wb") as f:
      f.write(data[:len(data) // 3])

  edits = {
      "missing_shard": lambda d: os.remove(os.path.join(d, shard)),
      "garbage_info": lambda d: open(os.path.join(d, "info.json"), "w").write("{garbage"),
      "no_info": lambda d: os.remove(os.path.join(d, "info.json")),
      "garbage_shard": lambda d: open(os.path.join(d, shard), "wb").write(b"garbage" * 20),
      "truncated_shard": lambda d: cut(os.path.join(d, shard)),
      "not_converted": lambda d: [os.remove(os.path.join(d, n)) for n in os.listdir(d)],
  }
  out = {"good": good}
  for name, edit in edits.items():
    out[name] = str(root / name)
    shutil.copytree(good, out[name])
    edit(out[name])
  return out


BROKEN = {  # what the error says about each broken folder
    "missing_shard": "lacks docs-00001.array_record (1 of the 2 shards its info.json lists",
    "garbage_info": "info.json is not readable JSON",
    "no_info": "has no info.json: its conversion did not finish",
    "garbage_shard": "docs-00001.array_record is not a readable ArrayRecord shard",
    "truncated_shard": "docs-00001.array_record is not a readable ArrayRecord shard",
    "not_converted": "holds no docs-*.array_record files",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_broken_converted_folder(name, converted):
  with pytest.raises(UserError) as e:
    make_sources(tiny_config(**{"data.mixture": f"shapes:1,{converted[name]}:1"}))
  assert converted[name] in str(e.value) and BROKEN[name] in str(e.value)
  assert "\n" not in str(e.value)


def test_good_converted_folder(converted):
  src, _ = make_sources(tiny_config(**{"data.mixture": converted["good"]}))["good"]
  assert len(src) == 2


def test_train_broken_converted_folder(converted, tmp_path, capsys, monkeypatch):
  one_error(train.main, ["--config", DEMO, "--workdir", str(tmp_path / "run"), *TINY,
                         f"--config.data.mixture=shapes:1,{converted['garbage_shard']}:1"],
            capsys, monkeypatch, converted["garbage_shard"], BROKEN["garbage_shard"])


def test_train_workdir_that_is_a_file(tmp_path, capsys, monkeypatch):
  # (a damaged checkpoint in a workdir: tests/test_resume.py::test_damaged_checkpoint_is_one_line)
  (tmp_path / "run").write_text("not a folder")
  one_error(train.main, ["--config", DEMO, "--workdir", str(tmp_path / "run"), *TINY],
            capsys, monkeypatch, str(tmp_path / "run"), "is a file, not a folder")


@pytest.mark.parametrize("name", ["missing_shard", "garbage_info"])
def test_tokenize_broken_converted_folder(name, converted, tmp_path, capsys, monkeypatch):
  one_error(tokenize.main, ["encode", "--tokenizer", str(tmp_path), "--input", converted[name],
                            "--output", str(tmp_path / "out"), "--image-size", "16"],
            capsys, monkeypatch, converted[name], BROKEN[name])


# ------------------------------------------------------------ tokenizer folders


TOKENIZERS = {  # name -> (files, what the error says)
    "empty": ({}, "the folder is empty"),
    "garbage_json": ({"tokenizer.json": "{garbage", "tokenizer_config.json": "{}"},
                     "tokenizer.json is not readable JSON"),
    "remote_code": ({"tokenizer_config.json": '{"auto_map": {"AutoTokenizer": ["t.Tok", null]}}'},
                    "never runs a checkpoint's code"),
    "no_vocabulary": ({"tokenizer_config.json": '{"tokenizer_class": "GPT2Tokenizer"}'},
                      "has no vocabulary"),
}


@pytest.mark.parametrize("name", list(TOKENIZERS))
def test_broken_tokenizer_folder(name, tmp_path):
  files, words = TOKENIZERS[name]
  for file, text in files.items():
    (tmp_path / file).write_text(text)
  with pytest.raises(UserError) as e:
    load_tokenizer(str(tmp_path))
  assert str(tmp_path) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_train_broken_tokenizer_folder(tmp_path, capsys, monkeypatch):
  (tmp_path / "tokenizer.json").write_text("{garbage")
  one_error(train.main, ["--config", DEMO, "--workdir", str(tmp_path / "run"), *TINY,
                         f"--config.data.tokenizer={tmp_path}"],
            capsys, monkeypatch, str(tmp_path), "tokenizer.json is not readable JSON")


# ---------------------------------------------------------------- safe loading


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  """name -> a weights file or folder that the loaders must refuse."""
  from safetensors.numpy import save_file
  root = tmp_path_factory.mktemp("weights")
  good = str(root / "good.safetensors")
  save_file({"x_embedder.weight": np.zeros((64, 64), np.float32)}, good)
  data = open(good, "rb").read()
  out = {"missing": str(root / "missing.safetensors")}
  for name, content in {"truncated.safetensors": data[:len(data) - 1000],
                        "garbage.safetensors": b"\xff" * 64, "model.bin": b"PK\x03\x04 pickle",
                        "model.ckpt": b"pickle"}.items():
    out[name] = str(root / name)
    with open(out[name], "wb") as f:
      f.write(content)
  os.makedirs(root / "bin_only")
  (root / "bin_only" / "config.json").write_text('{"_class_name": "FluxTransformer2DModel"}')
  (root / "bin_only" / "diffusion_pytorch_model.bin").write_bytes(b"pickle")
  out["bin_only"] = str(root / "bin_only")
  return out


@pytest.mark.parametrize("name, words", [
    ("missing", "does not exist"),
    ("truncated.safetensors", "is truncated: its header declares 16384 bytes of tensors"),
    ("garbage.safetensors", "not a readable safetensors file"),
    ("model.bin", "is a pickled PyTorch file: only safetensors weights are read"),
    ("model.ckpt", "is a pickled PyTorch file: only safetensors weights are read"),
    ("bin_only", "diffusion_pytorch_model.bin is a pickled PyTorch file"),
])
def test_mmdit_loader_refuses(name, words, weights):
  with pytest.raises(UserError) as e:
    diffusers_mmdit.load(weights[name], {})
  assert weights[name] in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_vae_and_llm_loaders_refuse_pickles(weights):
  with pytest.raises(UserError, match="pickled PyTorch file: only safetensors"):
    diffusers_vae.load_diffusers_vae(weights["model.bin"])
  with pytest.raises(UserError, match="pickled PyTorch file: only safetensors"):
    hf_llm.model_fields(weights["model.bin"])


def test_hub_libraries_are_offline(monkeypatch):
  names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
  for name in names:
    monkeypatch.delenv(name, raising=False)
  importlib.reload(unimm)
  assert all(os.environ[name] == "1" for name in names)
  monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # an explicit choice is left alone
  importlib.reload(unimm)
  assert os.environ["HF_HUB_OFFLINE"] == "0"
