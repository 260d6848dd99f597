"""python -m unimm.data.convert: every public format, with bad records, to ArrayRecord shards."""

import io
import json
import os
import subprocess
import sys

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from unimm.data import convert, formats, records
from unimm.data import fixtures as fx
from unimm.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BAD = fx.bad_images()
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run(fmt, inp, out, *extra):
  return convert.main(["--format", fmt, "--input", str(inp), "--output", str(out), *extra])


def read_back(out):
  """The documents of a converted folder, in order."""
  src = grain.sources.ArrayRecordDataSource(records.shard_paths(str(out)))
  return [records.unpack(src[i]) for i in range(len(src))]


def pixels(data):
  """What PIL decodes from encoded bytes: the pixels written."""
  return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def layout(doc):
  return [seg["kind"] if seg["kind"] == "text" else seg["role"] for seg in doc["segments"]]


def texts(doc):
  return [seg["text"] for seg in doc["segments"] if seg["kind"] == "text"]


def images(doc):
  return [records.decode_image(seg["bytes"]) for seg in doc["segments"] if seg["kind"] == "image"]


def noise(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def summary(documents, images_, skipped, repaired=None):
  return {"documents": documents, "images": images_, "skipped": skipped,
          "repaired": repaired or {}}


# ------------------------------------------------------------------ pairs


def test_img2dataset(tmp_path):
  pairs = fx.shapes_pairs(4, image_size=16)
  repairs = ["16bit_image", "cmyk_image", "palette_image", "alpha_image"]
  skips = ["empty_image", "undecodable_image", "truncated_image", "decompression_bomb"]
  shard0 = [{"image": png, "caption": cap} for png, cap in pairs[:2]]
  shard0 += [{"image": BAD[r], "caption": f"repaired {r}"} for r in repairs]
  shard1 = [{"image": png, "caption": cap} for png, cap in pairs[2:]]
  shard1 += [{"image": BAD[r], "caption": f"bad {r}"} for r in skips]
  shard1 += [{"image": None, "caption": "failed download"},
             {"image": BAD["palette_image"], "caption": None}]  # skipped: its repair not counted
  fx.write_img2dataset(str(tmp_path / "in" / "00000.parquet"), shard0, image_column="png")
  fx.write_img2dataset(str(tmp_path / "in" / "00001.parquet"), shard1, image_column="png")
  (tmp_path / "in" / "00000_stats.json").write_text("{}")  # img2dataset's side files are ignored
  out = tmp_path / "out"

  got = run("img2dataset", tmp_path / "in", out, "--docs-per-shard", "3")

  assert got == summary(8, 8, {s: 1 for s in skips} | {"missing_image": 1, "missing_text": 1},
                        {r: 1 for r in repairs})
  assert len(records.shard_paths(str(out))) == 3
  info = json.loads((out / records.INFO_FILE).read_text())
  assert info == dict(got, format="img2dataset", input=str(tmp_path / "in"),
                      shards=["docs-00000.array_record", "docs-00001.array_record",
                              "docs-00002.array_record"])
  docs = read_back(out)
  assert [texts(d)[0] for d in docs] == ([cap for _, cap in pairs[:2]]
                                         + [f"repaired {r}" for r in repairs]
                                         + [cap for _, cap in pairs[2:]])
  for d in docs:
    assert d["task"] == "t2i" and layout(d) == ["text", "target"]
    assert d["segments"][0]["loss"] is True
  good = docs[:2] + docs[6:]
  for d, (png, _) in zip(good, pairs):
    assert d["segments"][1]["bytes"] == png  # good images are stored as they came
    np.testing.assert_array_equal(images(d)[0], pixels(png))
  assert [d["meta"]["key"] for d in good] == ["000000000", "000000001", "000000000", "000000001"]
  assert good[0]["meta"]["url"] == "https://example.com/000000000.jpg"
  assert good[0]["meta"]["status"] == "success" and good[0]["meta"]["width"] == 16
  for d, r in zip(docs[2:6], repairs):  # repaired: stored as 8-bit RGB PNG
    data = d["segments"][1]["bytes"]
    assert data.startswith(PNG_MAGIC) and Image.open(io.BytesIO(data)).mode == "RGB", r
    assert images(d)[0].shape == (16, 16, 3)
  np.testing.assert_array_equal(images(docs[4])[0], pixels(BAD["palette_image"]))
  rgba = np.asarray(Image.open(io.BytesIO(BAD["alpha_image"])))
  expected = np.round(rgba[..., :3] * (rgba[..., 3:] / 255.0))  # composited on black
  assert np.abs(images(docs[5])[0] - expected).max() <= 1
  gray16 = np.asarray(Image.open(io.BytesIO(BAD["16bit_image"]))).astype(np.float64)
  np.testing.assert_array_equal(images(docs[2])[0][..., 0], np.round(gray16 / 65535 * 255))


def test_parquet_without_required_columns(tmp_path):
  path = tmp_path / "x.parquet"
  pq.write_table(pa.table({"url": ["u"], "caption": ["c"], "key": ["0"]}), path)
  with pytest.raises(UserError) as e:
    run("img2dataset", path, tmp_path / "out")
  msg = str(e.value)
  assert "\n" not in msg and "missing column(s) jpg or png or webp" in msg
  assert "it has url, caption, key" in msg
  assert not (tmp_path / "out").exists()  # checked before anything is written
  fx.write_instructpix2pix(str(tmp_path / "ip2p.parquet"), [])
  with pytest.raises(UserError, match=r"not hq_edit parquet: missing column\(s\) input_image, "
                                      r"edit, output_image; it has original_prompt"):
    run("hq_edit", tmp_path / "ip2p.parquet", tmp_path / "out")


def test_webdataset(tmp_path):
  pairs = fx.shapes_pairs(3, image_size=16, seed=1)
  good = pairs[0][0]
  fx.write_webdataset(str(tmp_path / "in" / "00000.tar"), [
      {"image": pairs[0][0], "caption": pairs[0][1]},
      {"image": pairs[1][0], "caption": pairs[1][1].encode() + b" \xff\xfe"},  # repaired
      {"image": good, "caption": "no json", "json": None},
      {"image": good, "caption": "bad json", "json": "{not json"},          # bad_json
      {"image": None, "caption": "no image"},                               # missing_image
  ])
  fx.write_webdataset(str(tmp_path / "in" / "00001.tar"), [
      {"image": pairs[2][0], "caption": None, "json": {"caption": "from json", "url": "u"}},
      {"image": good, "caption": None, "json": {"url": "u"}},               # missing_text
      {"image": good, "caption": "  \n"},                                    # blank: missing_text
      {"image": good, "caption": "list json", "json": [1, 2]},              # bad_schema
      {"image": BAD["cmyk_image"], "ext": "jpg", "caption": "cmyk", "key": "a_b"},  # repaired
      {"image": BAD["truncated_image"], "ext": "jpg", "caption": "truncated"},
  ])
  (tmp_path / "in" / "00000.parquet").write_bytes(b"ignored: not a tar")
  out = tmp_path / "out"

  got = run("webdataset", tmp_path / "in", out)

  assert got == summary(5, 5, {"bad_json": 1, "missing_image": 1, "missing_text": 2,
                               "bad_schema": 1, "truncated_image": 1},
                        {"non_utf8_text": 1, "cmyk_image": 1})
  docs = read_back(out)
  assert [texts(d)[0] for d in docs] == [pairs[0][1], pairs[1][1] + " \ufffd\ufffd", "no json",
                                         "from json", "cmyk"]
  assert all(d["task"] == "t2i" and layout(d) == ["text", "target"] for d in docs)
  for d, png in zip([docs[0], docs[1], docs[3]], [pairs[0][0], pairs[1][0], pairs[2][0]]):
    np.testing.assert_array_equal(images(d)[0], pixels(png))
  assert docs[0]["meta"]["key"] == "000000000" and docs[0]["meta"]["status"] == "success"
  assert "caption" not in docs[0]["meta"]
  assert docs[2]["meta"] == {"key": "000000002"}
  assert docs[3]["meta"] == {"key": "000000000", "url": "u"}
  assert docs[4]["meta"]["key"] == "a_b" and images(docs[4])[0].shape == (16, 16, 3)


def test_tfds(tmp_path):
  pairs = fx.shapes_pairs(3, image_size=16, seed=2)
  data_dir = str(tmp_path / "tfds")
  rows = [{"image": png, "caption": cap} for png, cap in pairs]
  rows += [{"image": BAD["undecodable_image"], "caption": "garbage"},
           {"image": pairs[0][0], "caption": b"caf\xe9"}]  # Latin-1, not UTF-8: repaired
  fx.write_tfds(data_dir, "shape_pairs", rows)
  fx.write_tfds(data_dir, "shape_labels", [{"image": png, "label": i % 2}
                                           for i, (png, _) in enumerate(pairs)],
                label_names=["cat", "dog"])
  fx.write_tfds(data_dir, "two_images", [{"image": pairs[0][0], "image_b": pairs[1][0],
                                          "caption": "x"}])

  got = run("tfds", data_dir, tmp_path / "out", "--name", "shape_pairs")

  assert got == summary(4, 4, {"undecodable_image": 1}, {"non_utf8_text": 1})
  docs = read_back(tmp_path / "out")
  assert [texts(d)[0] for d in docs] == [cap for _, cap in pairs] + ["caf\ufffd"]
  assert all(d["task"] == "t2i" and layout(d) == ["text", "target"] for d in docs)
  for d, png in zip(docs, [p for p, _ in pairs] + [pairs[0][0]]):
    assert d["segments"][1]["bytes"] == png  # SkipDecoding: the encoded bytes, untouched
    np.testing.assert_array_equal(images(d)[0], pixels(png))
  assert docs[3]["meta"] == {"dataset": "shape_pairs", "split": "train", "index": 4}
  info = json.loads((tmp_path / "out" / records.INFO_FILE).read_text())
  assert info["name"] == "shape_pairs" and info["split"] == "train"

  # A ClassLabel and no Text: the label name is the caption.
  assert run("tfds", data_dir, tmp_path / "out2", "--name", "shape_labels")["documents"] == 3
  docs = read_back(tmp_path / "out2")
  assert [texts(d)[0] for d in docs] == ["cat", "dog", "cat"]
  assert [d["meta"]["label"] for d in docs] == [0, 1, 0]

  with pytest.raises(UserError, match="exactly one Image feature, it has .'image', 'image_b'."):
    run("tfds", data_dir, tmp_path / "out3", "--name", "two_images")
  with pytest.raises(UserError, match="TFDS dataset 'nope' not found"):
    run("tfds", data_dir, tmp_path / "out3", "--name", "nope")
  with pytest.raises(UserError, match="Unknown split 'test'"):
    run("tfds", data_dir, tmp_path / "out3", "--name", "shape_pairs", "--split", "test")
  with pytest.raises(UserError, match="--format tfds needs --name"):
    run("tfds", data_dir, tmp_path / "out3")


# ------------------------------------------------------------------ edits


def test_instructpix2pix(tmp_path):
  src = [noise(32, 48, i) for i in range(3)]
  dst = [noise(32, 48, 10 + i) for i in range(3)]
  good = [{"original_image": fx.encode_png(s), "edited_image": fx.encode_png(t),
           "edit_prompt": f"edit {i}", "original_prompt": f"before {i}",
           "edited_prompt": f"after {i}"} for i, (s, t) in enumerate(zip(src, dst))]
  png = fx.encode_png(src[0])
  rows = [good[0],
          {"original_image": BAD["truncated_image"], "edited_image": png, "edit_prompt": "t"},
          {"original_image": png, "edited_image": None, "edit_prompt": "no edited image"},
          # Both images bad: the record is skipped once, for its first bad image.
          {"original_image": BAD["empty_image"], "edited_image": b"junk", "edit_prompt": "e"},
          {"original_image": png, "edited_image": png, "edit_prompt": None},
          good[1], good[2]]
  fx.write_instructpix2pix(str(tmp_path / "train-00000-of-00001.parquet"), rows)
  # An HF image struct with a path but no bytes (an external file): missing.
  table = pq.read_table(tmp_path / "train-00000-of-00001.parquet").slice(0, 1)
  table = table.set_column(1, "original_image",
                           pa.array([{"bytes": None, "path": "elsewhere.png"}], fx.HF_IMAGE))
  pq.write_table(table, tmp_path / "train-00001-of-00001.parquet")

  got = run("instructpix2pix", tmp_path, tmp_path / "out")

  assert got == summary(3, 6, {"truncated_image": 1, "missing_image": 2, "empty_image": 1,
                               "missing_text": 1})
  docs = read_back(tmp_path / "out")
  for i, d in enumerate(docs):
    assert d["task"] == "edit" and layout(d) == ["condition", "text", "target"]
    assert texts(d) == [f"edit {i}"]
    a, b = images(d)
    np.testing.assert_array_equal(a, src[i])
    np.testing.assert_array_equal(b, dst[i])
    assert d["meta"] == {"original_prompt": f"before {i}", "edited_prompt": f"after {i}"}


def test_hq_edit_and_max_pixels(tmp_path):
  a, b = noise(16, 24, 0), noise(16, 24, 1)
  rows = [{"input": "a photo", "input_image": fx.encode_png(a), "edit": "make it b",
           "inverse_edit": "make it a", "output": "b photo", "output_image": fx.encode_png(b)},
          {"input_image": fx.encode_png(a), "edit": "bomb", "output_image": BAD["decompression_bomb"]},
          {"input_image": BAD["16bit_image"], "edit": "deep", "output_image": fx.encode_png(b)}]
  fx.write_hq_edit(str(tmp_path / "hq.parquet"), rows)

  got = run("hq_edit", tmp_path / "hq.parquet", tmp_path / "out")

  assert got == summary(2, 4, {"decompression_bomb": 1}, {"16bit_image": 1})
  d, d2 = read_back(tmp_path / "out")
  assert d["task"] == "edit" and layout(d) == ["condition", "text", "target"]
  assert texts(d) == ["make it b"] and texts(d2) == ["deep"]
  np.testing.assert_array_equal(images(d)[0], a)
  np.testing.assert_array_equal(images(d)[1], b)
  assert d["meta"] == {"input": "a photo", "inverse_edit": "make it a", "output": "b photo"}
  # --max-pixels below 16 x 24: every image is a bomb.
  got = run("hq_edit", tmp_path / "hq.parquet", tmp_path / "out2", "--max-pixels", "383")
  assert got == summary(0, 0, {"decompression_bomb": 3})


# ------------------------------------------------------------ interleaved


def test_mmc4(tmp_path):
  imgs = [fx.encode_png(noise(16, 16, i)) for i in range(6)]
  images_dir = str(tmp_path / "images")  # the default: beside the input folder
  fx.write_mmc4(str(tmp_path / "shards" / "docs_shard_0_v2.jsonl.zip"), images_dir, [
      {"text_list": ["One.", "Two.", "Three.", "Four."], "url": "https://a.example", "images": [
          {"bytes": imgs[0], "matched_text_index": 2},
          {"bytes": imgs[1], "matched_text_index": 0},
          {"bytes": imgs[2], "matched_text_index": 2},       # same sentence: image_info order
          {"bytes": BAD["undecodable_image"], "matched_text_index": 3},  # dropped
          {"bytes": imgs[3], "matched_text_index": 9},       # out of range: dropped
          {"bytes": None, "matched_text_index": 1}]},        # no file: dropped
      "{this line is not JSON",
      {"text_list": ["Only text."], "images": [{"bytes": None, "matched_text_index": 0}]},
      {"text_list": "not a list", "images": []},
  ])
  fx.write_mmc4(str(tmp_path / "shards" / "docs_shard_1_v2.jsonl"), images_dir, [
      {"text_list": ["Last.", " ", "Words."], "images": [{"bytes": BAD["palette_image"],
                                                           "matched_text_index": 2}]},
      json.dumps({"text_list": ["Bad \udce9 text."], "image_info": [
          {"image_name": "x.png", "matched_text_index": 0}]}),
  ])
  with open(os.path.join(images_dir, "x.png"), "wb") as f:
    f.write(imgs[4])
  with open(tmp_path / "shards" / "docs_shard_1_v2.jsonl", "ab") as f:  # a Latin-1 line
    f.write(json.dumps({"text_list": ["caf\u00e9"], "image_info": [
        {"image_name": "x.png", "matched_text_index": 0}]}, ensure_ascii=False)
        .encode("latin-1") + b"\n")

  got = run("mmc4", tmp_path / "shards", tmp_path / "out")

  assert got == summary(4, 6, {"undecodable_image": 1, "bad_position": 1, "missing_image": 2,
                               "bad_json": 1, "no_images": 1, "bad_schema": 1},
                        {"palette_image": 1, "non_utf8_text": 2})
  docs = read_back(tmp_path / "out")
  d = docs[0]
  assert d["task"] == "interleaved"
  assert layout(d) == ["condition", "text", "condition", "condition", "text"]
  assert texts(d) == ["One. Two.", "Three. Four."]
  for got_img, want in zip(images(d), [imgs[1], imgs[0], imgs[2]]):
    np.testing.assert_array_equal(got_img, pixels(want))
  assert d["meta"]["url"] == "https://a.example" and len(d["meta"]["image_names"]) == 3
  assert all(seg["loss"] for seg in d["segments"] if seg["kind"] == "text")
  assert layout(docs[1]) == ["text", "condition", "text"] and texts(docs[1]) == ["Last.", "Words."]
  assert texts(docs[2]) == ["Bad \ufffd text."] and texts(docs[3]) == ["caf\ufffd"]
  np.testing.assert_array_equal(images(docs[3])[0], pixels(imgs[4]))


def test_obelics(tmp_path):
  imgs = [fx.encode_png(noise(16, 16, i)) for i in range(3)]
  fx.write_obelics(str(tmp_path / "obelics" / "train-00000.parquet"),
                   str(tmp_path / "obelics" / "images"), [
      [{"text": "Intro."}, {"image": imgs[0]}, {"text": "Middle."}, {"text": "More."},
       {"image": imgs[1]}],
      [{"image": BAD["empty_image"]}, {"text": "Kept."}, {"text": "both", "image": imgs[2]},
       {}, {"image": BAD["alpha_image"]}, {"image": None, "url": "https://gone.example/x.png"},
       {"text": "End."}],
      [{"text": "No images at all."}],
      {"positions": [{"image": imgs[0]}], "general_metadata": "{broken"},
  ])
  # Unequal texts / images lists: bad_schema.
  pq.write_table(pa.table({"images": [["u"]], "metadata": ["[]"], "general_metadata": ["{}"],
                           "texts": [["a", None]]}), tmp_path / "obelics" / "train-00001.parquet")
  (tmp_path / "obelics" / "images" / "README").write_text("not an image")

  # images/ inside the input folder is found when there is none beside it.
  got = run("obelics", tmp_path / "obelics", tmp_path / "out")

  assert got == summary(2, 3, {"empty_image": 1, "bad_position": 2, "missing_image": 1,
                               "no_images": 1, "bad_json": 1, "bad_schema": 1},
                        {"alpha_image": 1})
  d, d2 = read_back(tmp_path / "out")
  assert d["task"] == "interleaved"
  assert layout(d) == ["text", "condition", "text", "condition"]
  assert texts(d) == ["Intro.", "Middle.\n\nMore."]
  for got_img, want in zip(images(d), imgs[:2]):
    np.testing.assert_array_equal(got_img, pixels(want))
  assert d["meta"]["general_metadata"]["url"] == "https://example.com/doc0"
  assert d["meta"]["image_urls"] == ["https://example.com/doc0/img1.jpg",
                                     "https://example.com/doc0/img4.jpg"]
  assert layout(d2) == ["text", "condition", "text"] and texts(d2) == ["Kept.", "End."]


# ---------------------------------------------------------- subject-driven


def test_omnigen(tmp_path):
  imgs = [fx.encode_png(noise(16, 16, i)) for i in range(3)]
  ph = "<img><|image_{}|></img>".format
  rows = [
      {"task_type": "try-on", "instruction": f"{ph(1)} wears {ph(2)}.",
       "input_images": [imgs[0], imgs[1]], "output_image": imgs[2]},
      {"task_type": "text_to_image", "instruction": "A red circle.", "input_images": [],
       "output_image": imgs[2]},
      {"instruction": f"{ph(2)} then {ph(1)}", "input_images": [imgs[0], BAD["16bit_image"]],
       "output_image": imgs[2]},                                  # task "subject"; repaired
      {"task_type": "x", "instruction": f"{ph(3)}", "input_images": [imgs[0]],
       "output_image": imgs[2]},                                  # out of range
      {"task_type": "x", "instruction": f"{ph(1)} only", "input_images": [imgs[0], imgs[1]],
       "output_image": imgs[2]},                                  # image 2 never referenced
      {"task_type": "x", "instruction": f"{ph(1)} and {ph(1)}", "input_images": [imgs[0]],
       "output_image": imgs[2]},                                  # count mismatch
      {"task_type": "x", "instruction": f"{ph(1)}", "input_images": [imgs[0]],
       "output_image": None},                                     # no output file
      {"task_type": "x", "instruction": f"{ph(1)}", "input_images": [BAD["truncated_image"]],
       "output_image": imgs[2]},                                  # bad input image: whole row
      {"task_type": "x", "input_images": [], "output_image": imgs[2]},  # no instruction
      "not json at all",
  ]
  fx.write_omnigen(str(tmp_path / "x2i" / "toy.jsonl"), str(tmp_path / "x2i"), rows)

  got = run("omnigen", tmp_path / "x2i" / "toy.jsonl", tmp_path / "out")

  assert got == summary(3, 7, {"placeholder_mismatch": 3, "missing_image": 1,
                               "truncated_image": 1, "bad_schema": 1, "bad_json": 1},
                        {"16bit_image": 1})
  d, t2i, subject = read_back(tmp_path / "out")
  assert d["task"] == "try-on"
  assert layout(d) == ["condition", "text", "condition", "text", "target"]
  assert texts(d) == [" wears ", "."]
  for got_img, want in zip(images(d), imgs):
    np.testing.assert_array_equal(got_img, pixels(want))
  assert d["meta"]["input_images"] == ["toy_0_in0.png", "toy_0_in1.png"]
  assert t2i["task"] == "text_to_image" and layout(t2i) == ["text", "target"]
  assert subject["task"] == "subject" and texts(subject) == [" then "]
  assert layout(subject) == ["condition", "text", "condition", "target"]
  np.testing.assert_array_equal(images(subject)[1], pixels(imgs[0]))  # image 1 comes second


# -------------------------------------------------------------------- CLI


def _cli(*args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "unimm.data.convert", *map(str, args)],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


def test_cli_old_img2dataset_schema_with_jpeg(tmp_path):
  # img2dataset 1.2x (pandas writer): key, jpg, txt and the metadata columns.
  ramp = np.linspace(0, 200, 16).astype(np.uint8)
  arrays = [np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], 128 + 0 * ramp[:, None]),
                     -1) + np.uint8(10 * i) for i in range(2)]
  jpegs = [fx.encode_jpeg(a) for a in arrays]
  pq.write_table(pa.table({
      "key": ["000000000", "000000001"], "jpg": jpegs,
      "txt": ["first", "second"], "url": ["u0", "u1"], "caption": [None, "second"],
      "status": ["success", "success"]}), tmp_path / "00000.parquet")

  r = _cli("--format", "img2dataset", "--input", tmp_path / "00000.parquet",
           "--output", tmp_path / "out")

  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert got == summary(1, 1, {"missing_text": 1})  # the `caption` column wins over `txt`
  (d,) = read_back(tmp_path / "out")
  assert texts(d) == ["second"] and d["meta"] == {"key": "000000001", "url": "u1",
                                                  "status": "success"}
  np.testing.assert_array_equal(images(d)[0], pixels(jpegs[1]))
  assert np.abs(images(d)[0].astype(int) - arrays[1]).mean() < 3  # JPEG: close to the array


def test_cli_errors(tmp_path):
  r = _cli("--format", "laion", "--input", tmp_path, "--output", tmp_path / "out")
  assert r.returncode == 2
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: unknown --format 'laion'")
  assert all(f in lines[0] for f in formats.FORMATS)
  assert r.stdout == ""

  with pytest.raises(UserError, match="--input .* does not exist"):
    run("webdataset", tmp_path / "nothing", tmp_path / "out")
  with pytest.raises(UserError, match=r"holds no \*.tar files"):
    run("webdataset", tmp_path, tmp_path / "out")
  with pytest.raises(UserError, match="required: --input"):
    convert.main(["--format", "mmc4", "--output", str(tmp_path / "out")])
  with pytest.raises(UserError, match="images folder .* does not exist .*--images"):
    fx.write_mmc4(str(tmp_path / "m" / "a.jsonl"), str(tmp_path / "m" / "pics"), [])
    run("mmc4", tmp_path / "m" / "a.jsonl", tmp_path / "out")
  fx.write_webdataset(str(tmp_path / "w" / "0.tar"), [{"image": BAD["alpha_image"], "caption": "c"}])
  assert run("webdataset", tmp_path / "w", tmp_path / "out")["documents"] == 1
  with pytest.raises(UserError, match="already holds 1 shard"):
    run("webdataset", tmp_path / "w", tmp_path / "out")


def test_parquet_variants_with_named_columns(tmp_path):
  """LAION metadata with an image-bytes column and a Hugging Face export (image as a
  {bytes, path} struct) convert with --caption-column / --image-column / --url-column."""
  arrays = [noise(16, 24, i) for i in range(2)]
  jpegs, pngs = [fx.encode_jpeg(a) for a in arrays], [fx.encode_png(a) for a in arrays]
  pq.write_table(pa.table({
      "URL": ["http://a/0.jpg", "http://a/1.jpg"], "TEXT": ["a red cat", None],
      "WIDTH": [24, 24], "HEIGHT": [16, 16], "image_bytes": jpegs}), tmp_path / "laion.parquet")
  got = run("img2dataset", tmp_path / "laion.parquet", tmp_path / "laion", "--caption-column",
            "TEXT", "--image-column", "image_bytes", "--url-column", "URL")
  assert got == summary(1, 1, {"missing_text": 1})
  (d,) = read_back(tmp_path / "laion")
  assert layout(d) == ["text", "target"] and texts(d) == ["a red cat"]
  assert d["meta"] == {"url": "http://a/0.jpg", "WIDTH": 24, "HEIGHT": 16}
  np.testing.assert_array_equal(images(d)[0], pixels(jpegs[0]))
  info = records.read_info(str(tmp_path / "laion"))
  assert info["caption_column"] == "TEXT" and info["url_column"] == "URL"

  structs = [{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(pngs)]
  pq.write_table(pa.table({"image": structs, "caption": ["one", "two"], "id": [7, 8]}),
                 tmp_path / "hf.parquet")
  got = run("img2dataset", tmp_path / "hf.parquet", tmp_path / "hf", "--image-column", "image")
  assert got == summary(2, 2, {})
  docs = read_back(tmp_path / "hf")
  assert [texts(d) for d in docs] == [["one"], ["two"]] and docs[1]["meta"] == {"id": 8}
  np.testing.assert_array_equal(images(docs[1])[0], arrays[1])

  with pytest.raises(UserError) as e:
    run("img2dataset", tmp_path / "hf.parquet", tmp_path / "x", "--caption-column", "TEXT")
  msg = str(e.value)
  assert "\n" not in msg and "--caption-column 'TEXT' is not a column of" in msg
  assert msg.endswith("it has image, caption, id") and not (tmp_path / "x").exists()
  with pytest.raises(UserError, match=r"--image-column 'caption' .* holds string, not image"):
    run("img2dataset", tmp_path / "hf.parquet", tmp_path / "x", "--image-column", "caption")
  with pytest.raises(UserError, match="--url-column apply to --format img2dataset"):
    run("mmc4", tmp_path / "hf.parquet", tmp_path / "x", "--url-column", "URL")
  r = _cli("--format", "img2dataset", "--input", tmp_path / "laion.parquet", "--output",
           tmp_path / "x", "--image-column", "jpg")
  assert r.returncode == 2 and r.stderr.strip().splitlines() == [
      f"error: --image-column 'jpg' is not a column of {tmp_path / 'laion.parquet'}: it has "
      "URL, TEXT, WIDTH, HEIGHT, image_bytes"]
