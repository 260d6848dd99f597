"""unimm.tokenize: reconstruct / encode / decode over good and bad images, the latent cache,
and one-line errors for workdirs that are not (matching) tokenizers.

Two tiny tokenizers (16x16 images, f=2, 64 codes; conftest.py) are trained once; each
CLI run happens once per tokenizer (module fixtures) and the tests read its outputs."""

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import msgpack
import numpy as np
import pytest
from PIL import Image

from tests.helpers import quick_compiles
from unimm import tokenize as tk
from unimm.data import fixtures, records
from unimm.errors import UserError, cli
from unimm.train import autoencoder as ae

S = 16  # the tiny tokenizers' image size; latents are 8 x 8 (f = 2)
GOOD = ["good0", "good1", "photo", "sub/good2"]
REPAIRED = {"16bit_image": 1, "alpha_image": 1, "cmyk_image": 1, "grayscale_image": 1,
            "palette_image": 1}
SKIPPED = {"decompression_bomb": 1, "empty_image": 1, "truncated_image": 1,
           "undecodable_image": 1}
NAMES = sorted(GOOD + ["odd", "gray", "16bit_image", "alpha_image", "cmyk_image",
                       "palette_image"])


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
  """XLA with most optimisations off for this module (conftest.quick_compiles)."""
  with quick_compiles():
    yield
  tk._LOADED.clear()  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def tokenizers(tiny_tokenizers):
  return tiny_tokenizers


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
  """4 good images (one a 32x32 JPEG), an odd 33x47 one, an 8-bit gray one, each of
  fixtures.bad_images() and two files that are not images."""
  d = str(tmp_path_factory.mktemp("images"))
  pngs = [png for png, _ in fixtures.shapes_pairs(3, image_size=S, seed=5)]
  _write(f"{d}/good0.png", pngs[0])
  _write(f"{d}/good1.png", pngs[1])
  _write(f"{d}/sub/good2.png", pngs[2])
  rng = np.random.default_rng(0)
  _write(f"{d}/photo.jpg", fixtures.encode_jpeg(rng.integers(0, 256, (32, 32, 3), np.uint8)))
  _write(f"{d}/odd.png", fixtures.encode_png(rng.integers(0, 256, (33, 47, 3), np.uint8)))
  _write(f"{d}/gray.png", fixtures.encode_png(rng.integers(0, 256, (S, S), np.uint8)))
  ext = {"truncated_image": "jpg", "cmyk_image": "jpg", "undecodable_image": "webp"}
  for reason, data in fixtures.bad_images().items():
    _write(f"{d}/{reason}.{ext.get(reason, 'png')}", data)
  _write(f"{d}/notes.txt", b"not an image")
  _write(f"{d}/README", b"no extension")
  return d


def _run(capsys, argv):
  """main(argv); checks that the last stdout line is the returned summary."""
  summary = tk.main(argv)
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert json.loads(last) == json.loads(json.dumps(summary))
  return summary


@pytest.fixture(scope="module")
def outputs(tokenizers, image_folder, tmp_path_factory):
  """kind -> {"rec", "enc", "dec": (summary, folder)} of one run each over image_folder."""
  out = {}
  for kind, tok in tokenizers.items():
    base = tmp_path_factory.mktemp(f"out_{kind}")
    rec, enc, dec = (str(base / n) for n in ("rec", "enc", "dec"))
    out[kind] = {
        "rec": (tk.main(["reconstruct", "--tokenizer", tok, "--input", image_folder,
                         "--output", rec, "--batch-size", "4"]), rec),
        "enc": (tk.main(["encode", "--tokenizer", tok, "--input", image_folder,
                         "--output", enc, "--batch-size", "4"]), enc)}
    out[kind]["dec"] = (tk.main(["decode", "--tokenizer", tok, "--input", enc,
                                 "--output", dec, "--batch-size", "4"]), dec)
  return out


def _png(path):
  return np.asarray(Image.open(path))


@pytest.mark.parametrize("kind", ["vae", "vq"])
def test_reconstruct_counts_every_kind_of_bad_image(outputs, tokenizers, image_folder, kind):
  summary, folder = outputs[kind]["rec"]
  assert summary["images"] == 10
  assert summary["skipped"] == SKIPPED
  assert summary["repaired"] == REPAIRED
  assert summary["resized"] == 2 and summary["cropped"] == 1  # photo 32x32; odd 33x47
  assert summary["ignored_files"] == 2  # notes.txt, README
  assert summary["input_kind"] == "folder" and summary["image_size"] == S
  assert summary["tokenizer"]["kind"] == kind and summary["tokenizer"]["factor"] == 2
  assert summary["tokenizer"]["workdir"] == os.path.abspath(tokenizers[kind])
  report = json.load(open(os.path.join(folder, "report.json")))
  assert {k: report[k] for k in summary} == json.loads(json.dumps(summary))
  assert sorted(r["name"] for r in report["per_image"]) == NAMES
  assert sorted((r["name"], r["reason"]) for r in report["skipped_images"]) == sorted(
      (r, r) for r in SKIPPED)
  pngs = sorted(os.path.relpath(os.path.join(r, n), folder)[:-4]
                for r, _, ns in os.walk(folder) for n in ns if n.endswith(".png"))
  assert pngs == NAMES
  rows = {r["name"]: r for r in report["per_image"]}
  assert rows["odd"]["size"] == [33, 47] and rows["gray"]["repaired"] == "grayscale_image"
  # PSNR / SSIM are scikit-image's on the S x S input and the written reconstruction
  from skimage.metrics import peak_signal_noise_ratio, structural_similarity
  for name in ("good0", "odd"):
    data = open(os.path.join(image_folder, name + ".png"), "rb").read()
    x, y = records.decode_image(data, size=(S, S)), _png(os.path.join(folder, name + ".png"))
    assert y.shape == (S, S, 3)
    assert rows[name]["psnr"] == pytest.approx(peak_signal_noise_ratio(x, y, data_range=255))
    assert rows[name]["ssim"] == pytest.approx(
        structural_similarity(x, y, channel_axis=-1, data_range=255))
  assert summary["psnr"] == pytest.approx(np.mean([r["psnr"] for r in rows.values()]))
  assert summary["ssim"] == pytest.approx(np.mean([r["ssim"] for r in rows.values()]))
  if kind == "vq":
    assert summary["tokens"] == 10 * 8 * 8 and summary["num_codes"] == 64
    assert 1 <= summary["codes_used"] <= 64
    assert summary["usage"] == summary["codes_used"] / 64
    assert 1 <= summary["perplexity"] <= summary["codes_used"]
  else:
    assert "usage" not in summary


@pytest.mark.parametrize("kind", ["vae", "vq"])
def test_encode_then_decode_equals_reconstruct(outputs, kind):
  enc, enc_dir = outputs[kind]["enc"]
  dec, dec_dir = outputs[kind]["dec"]
  _, rec_dir = outputs[kind]["rec"]
  for k in ("images", "skipped", "repaired", "resized", "cropped", "ignored_files"):
    assert enc[k] == outputs[kind]["rec"][0][k]
  assert enc["dtype"] == ("float32" if kind == "vae" else "int32")
  assert dec["images"] == 10 and dec["skipped"] == {}
  assert dec["ignored_files"] == 1  # encode's report.json
  for name in NAMES:
    z = np.load(os.path.join(enc_dir, name + ".npy"))
    assert z.shape == ((8, 8, 4) if kind == "vae" else (8, 8))
    assert z.dtype == (np.float32 if kind == "vae" else np.int32)
    np.testing.assert_array_equal(_png(os.path.join(dec_dir, name + ".png")),
                                  _png(os.path.join(rec_dir, name + ".png")))


def test_decode_skips_bad_latents(tokenizers, outputs, tmp_path, capsys):
  src = tmp_path / "npy"
  shutil.copytree(outputs["vq"]["enc"][1], src)
  np.save(src / "wrong_shape.npy", np.zeros((8, 8, 4), np.float32))   # a vae latent
  np.save(src / "out_of_range.npy", np.full((8, 8), 64, np.int32))    # codes 0..63
  (src / "garbage.npy").write_bytes(b"not numpy")
  s = _run(capsys, ["decode", "--tokenizer", tokenizers["vq"], "--input", str(src),
                    "--output", str(tmp_path / "dec")])
  assert s["images"] == 10 and s["skipped"] == {"bad_latent": 3} and s["ignored_files"] == 1


def test_native_size_crops_to_a_multiple_of_f(tokenizers, image_folder, tmp_path, capsys):
  s = _run(capsys, ["reconstruct", "--tokenizer", tokenizers["vae"], "--input",
                    os.path.join(image_folder, "odd.png"), "--output", str(tmp_path),
                    "--image-size", "native"])
  assert s["images"] == 1 and s["resized"] == 0 and s["cropped"] == 1
  assert s["image_size"] == "native" and s["input_kind"] == "file"
  assert _png(tmp_path / "odd.png").shape == (32, 46, 3)  # 33 x 47 -> multiples of 2
  s = _run(capsys, ["reconstruct", "--tokenizer", tokenizers["vae"], "--input",
                    os.path.join(image_folder, "odd.png"), "--output", str(tmp_path / "few"),
                    "--image-size", "native", "--max-tokens", "100"])
  assert s["images"] == 0 and s["skipped"] == {"too_many_tokens": 1}
  with pytest.raises(UserError, match="not a multiple of the tokenizer's downsampling factor 2"):
    tk.main(["reconstruct", "--tokenizer", tokenizers["vae"], "--input", image_folder,
             "--output", str(tmp_path / "x"), "--image-size", "15"])


def test_shapes_input_reproduces_the_training_eval(tokenizers, tmp_path, capsys):
  s = _run(capsys, ["reconstruct", "--tokenizer", tokenizers["vae"], "--input", "shapes",
                    "--limit", "4", "--output", str(tmp_path)])
  assert s["images"] == 4 and s["input_kind"] == "shapes"
  assert sorted(os.listdir(tmp_path)) == ["report.json"] + [f"shapes-{i:05d}.png" for i in range(4)]
  ev = json.load(open(os.path.join(tokenizers["vae"], "eval.json")))  # the same 4 held-out images
  assert s["psnr"] == pytest.approx(ev["psnr_per_image_mean"], abs=0.05)
  assert s["psnr_pooled"] == pytest.approx(ev["psnr"], abs=0.05)


def test_skimage_input(tokenizers, tmp_path, capsys):
  s = _run(capsys, ["reconstruct", "--tokenizer", tokenizers["vae"], "--input", "skimage",
                    "--limit", "3", "--output", str(tmp_path)])
  # astronaut (RGB 512x512), brick and camera (8-bit gray 512x512)
  assert s["images"] == 3 and s["repaired"] == {"grayscale_image": 2} and s["resized"] == 3
  assert s["input_kind"] == "skimage" and sorted(os.listdir(tmp_path)) == [
      "astronaut.png", "brick.png", "camera.png", "report.json"]


# ------------------------------------------------------------- latent cache


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """A converted folder of 8 documents (2 shards): three good single-task ones (one
  image CMYK), a pair whose image is truncated, an interleaved one with one empty
  image of two, an interleaved one whose only image is garbage, a text-only one, and
  an edit."""
  d = str(tmp_path_factory.mktemp("converted"))
  good = [png for png, _ in fixtures.shapes_pairs(4, image_size=24, seed=3)]
  bad = fixtures.bad_images()
  img = lambda b, role="target": {"kind": "image", "bytes": b, "role": role}
  txt = lambda t, loss=True: {"kind": "text", "text": t, "loss": loss}
  docs = [
      {"task": "t2i", "segments": [txt("a red square", False), img(good[0])], "meta": {"i": 0}},
      {"task": "caption", "segments": [img(good[1], "condition"), txt("a blue circle")],
       "meta": {"i": 1}},
      {"task": "t2i", "segments": [txt("cmyk"), img(bad["cmyk_image"])], "meta": {"i": 2}},
      {"task": "t2i", "segments": [txt("cut"), img(bad["truncated_image"])], "meta": {"i": 3}},
      {"task": "interleaved", "segments": [txt("one"), img(good[2], "condition"), txt("two"),
                                           img(b"", "condition"), txt("three")],
       "meta": {"i": 4}},
      {"task": "interleaved", "segments": [txt("only"), img(bad["undecodable_image"])],
       "meta": {"i": 5}},
      {"task": "text", "segments": [txt("just words")], "meta": {"i": 6}},
      {"task": "edit", "segments": [img(good[3], "condition"), txt("make it green", False),
                                    img(good[0])], "meta": {"i": 7}},
  ]
  w = records.ShardWriter(d, docs_per_shard=5)
  for doc in docs:
    w.write(doc)
  w.close({"format": "fixture", "documents": 8, "images": 10, "skipped": {}, "repaired": {}})
  return d, docs


CACHE_SKIPPED = {"empty_image": 1, "no_images": 1, "truncated_image": 1, "undecodable_image": 1}
KEPT = [0, 1, 2, 4, 6, 7]


def _read_cache(folder):
  from array_record.python.array_record_module import ArrayRecordReader
  docs = []
  for path in records.shard_paths(folder):
    r = ArrayRecordReader(path)
    docs += [msgpack.unpackb(b, raw=False) for b in r.read(0, r.num_records())]
    r.close()
  return docs


@pytest.mark.parametrize("kind", ["vae", "vq"])
def test_latent_cache(tokenizers, converted, tmp_path, capsys, kind):
  from unimm.models.autoencoder import load_autoencoder
  src, docs = converted
  out = str(tmp_path / "cache")
  s = _run(capsys, ["encode", "--tokenizer", tokenizers[kind], "--input", src, "--output", out,
                    "--batch-size", "4", "--docs-per-shard", "4"])
  assert s["documents"] == 6 and s["images"] == 6
  assert s["skipped"] == CACHE_SKIPPED and s["repaired"] == {"cmyk_image": 1}
  assert s["resized"] == 5 and s["cropped"] == 0  # 24x24 shapes; the CMYK one is 16x16
  info = json.load(open(os.path.join(out, "info.json")))
  assert info["format"] == "fixture" and info["documents"] == 6 and info["images"] == 6
  assert info["shards"] == ["docs-00000.array_record", "docs-00001.array_record"]
  tok = load_autoencoder(tokenizers[kind])
  assert info["tokenizer"] == {"workdir": os.path.abspath(tokenizers[kind]), "kind": kind,
                               "step": 4, "factor": 2, "image_size": S,
                               "num_codes": 64 if kind == "vq" else 0,
                               "channels": 4 if kind == "vae" else 0}
  assert info["latent_cache"]["skipped"] == CACHE_SKIPPED
  cache = _read_cache(out)
  assert [d["meta"]["i"] for d in cache] == KEPT
  for got in cache:
    want = docs[got["meta"]["i"]]
    assert got["v"] == 1 and got["task"] == want["task"]
    assert [x for x in got["segments"] if x["kind"] == "text"] == [
        x for x in want["segments"] if x["kind"] == "text"]
    wimg = [x for x in want["segments"] if x["kind"] == "image"]
    if got["meta"]["i"] == 4:
      wimg = wimg[:1]  # the empty image is dropped
    gimg = [x for x in got["segments"] if x["kind"] == "image"]
    assert len(gimg) == len(wimg)
    for g, w in zip(gimg, wimg):
      assert set(g) == {"kind", "role", "latent"} and g["role"] == w["role"]
      lat = g["latent"]
      assert lat["dtype"] == ("float16" if kind == "vae" else "int32")
      assert lat["shape"] == ([8, 8, 4] if kind == "vae" else [8, 8])
      z = tk.read_latent(g)
      fixed, _ = records.check_image(w["bytes"])
      ref = tok.encode(records.decode_image(fixed, size=(S, S))[None])[0]
      if kind == "vae":
        assert z.dtype == np.float16
        np.testing.assert_allclose(z.astype(np.float32), ref, atol=2e-3, rtol=2e-3)
      else:
        assert z.dtype == np.int32
        np.testing.assert_array_equal(z, ref)
  with pytest.raises(UserError, match="already holds"):
    tk.main(["encode", "--tokenizer", tokenizers[kind], "--input", src, "--output", out])
  with pytest.raises(UserError, match="already a latent cache"):
    tk.main(["encode", "--tokenizer", tokenizers[kind], "--input", out,
             "--output", str(tmp_path / "again")])


def test_latent_cache_keep_images(tokenizers, converted, tmp_path, capsys):
  src, docs = converted
  s = _run(capsys, ["encode", "--tokenizer", tokenizers["vq"], "--input", src, "--output",
                    str(tmp_path), "--keep-images", "--limit", "2"])
  assert s["documents"] == 2 and s["skipped"] == {}
  for got in _read_cache(str(tmp_path)):
    for g, w in zip([x for x in got["segments"] if x["kind"] == "image"],
                    [x for x in docs[got["meta"]["i"]]["segments"] if x["kind"] == "image"]):
      assert g["bytes"] == w["bytes"] and "latent" in g


def test_read_latent_round_trip_and_bad_segments():
  z = np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7
  seg = {"kind": "image", "role": "target", "latent": tk.latent_field(z)}
  packed = msgpack.unpackb(msgpack.packb(seg, use_bin_type=True), raw=False)
  np.testing.assert_allclose(tk.read_latent(packed), z.astype(np.float16))
  codes = np.arange(6, dtype=np.int64).reshape(2, 3)
  assert tk.latent_field(codes)["dtype"] == "int32"
  np.testing.assert_array_equal(tk.read_latent({"latent": tk.latent_field(codes)}), codes)
  for bad in ({}, {"latent": {"dtype": "float16", "shape": [2, 2], "data": b"\0" * 6}},
              {"latent": {"dtype": "complex64", "shape": [1], "data": b"\0" * 8}}):
    with pytest.raises(records.Skip) as e:
      tk.read_latent(bad)
    assert e.value.reason == "bad_latent"


# ------------------------------------------------------------------- errors


def test_not_a_workdir_is_one_line_exit_2(tmp_path):
  env = dict(os.environ, PYTHONPATH=os.getcwd())
  p = subprocess.run([sys.executable, "-m", "unimm.tokenize", "reconstruct", "--tokenizer",
                      str(tmp_path), "--input", "shapes", "--output", str(tmp_path / "o")],
                     capture_output=True, text=True, env=env, timeout=120)
  assert p.returncode == 2 and p.stdout == ""
  assert p.stderr.startswith("error: ") and p.stderr.count("\n") == 1
  assert "is not a tokenizer workdir" in p.stderr and "Traceback" not in p.stderr


def test_checkpoint_that_does_not_match_its_config(tokenizers, tmp_path, capsys, monkeypatch):
  bad = tmp_path / "tok"
  shutil.copytree(tokenizers["vae"], bad)
  cfg = json.load(open(bad / "config.json"))
  cfg["tokenizer"]["block_out_channels"] = [8, 32]
  json.dump(cfg, open(bad / "config.json", "w"))
  monkeypatch.setattr(sys, "argv", ["tokenize", "encode", "--tokenizer", str(bad), "--input",
                                    "shapes", "--output", str(tmp_path / "o")])
  with pytest.raises(SystemExit) as e:
    cli(tk.main)
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1
  # the first mismatching parameter (tree order) and both shapes
  assert ("does not match the config: parameter 'params.decoder.conv_in.bias' has shape (16,) "
          "in the checkpoint but (32,) in the config") in err


@pytest.mark.parametrize("argv,words", [
    (["reconstruct", "--input", "x", "--output", "y"], "--tokenizer"),
    (["squash", "--tokenizer", "t"], "invalid choice"),
    (["reconstruct", "--tokenizer", "/nonexistent/tok", "--input", "x", "--output", "y"],
     "is not a folder"),
])
def test_bad_arguments_are_user_errors(argv, words):
  with pytest.raises(UserError, match=words):
    tk.main(argv)


def test_missing_input_is_a_user_error(tokenizers, tmp_path):
  with pytest.raises(UserError, match="does not exist"):
    tk.main(["reconstruct", "--tokenizer", tokenizers["vq"], "--input", str(tmp_path / "none"),
             "--output", str(tmp_path / "o")])
