"""python -m unimm.data.curate: filters, deduplication, resuming, Shapes with planted faults."""

import json
import os

import numpy as np
import pyarrow.parquet as pq
import pytest

from unimm.data import curate, records
from unimm.data import fixtures as fx
from unimm.errors import UserError


def doc(text, pixels=None, data=None):
  data = fx.encode_png(pixels) if data is None else data
  return {"task": "t2i", "segments": [{"kind": "text", "text": text, "loss": True},
                                      {"kind": "image", "bytes": data, "role": "target"}]}


def scene(seed, h=16, w=16):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def read_back(folder):
  out = []
  for path in records.shard_paths(str(folder)):
    reader = records.open_shard(path)
    out += reader.read(0, reader.num_records())
    reader.close()
  return out


def table(folder):
  return pq.read_table(os.path.join(folder, curate.TABLE_FILE)).to_pylist()


def test_filters_name_each_reason_and_a_malformed_record(tmp_path):
  from array_record.python.array_record_module import ArrayRecordWriter
  good = scene(1)
  docs = [doc("a red circle at the top", good),                    # kept
          doc("a tiny image", scene(2, 8, 8)),                     # too_small
          doc("a long strip", scene(3, 16, 80)),                   # bad_aspect
          doc("a flat grey square", np.full((16, 16, 3), 90, np.uint8)),  # flat_image
          doc("", scene(4)),                                       # caption_too_short
          doc("1234 5678 ###", scene(5)),                          # few_letters
          doc("a red circle at the top", data=fx.bad_images()[records.TRUNCATED_IMAGE]),
          doc("the same picture again", good)]                     # exact_duplicate
  src = tmp_path / "src"
  os.makedirs(src)
  writer = ArrayRecordWriter(str(src / "docs-00000.array_record"), "group_size:1")
  for d in docs:
    writer.write(records.pack(d))
  writer.write(b"\x93not a document")                              # malformed_record
  writer.close()
  (src / records.INFO_FILE).write_text(json.dumps({"shards": ["docs-00000.array_record"]}))
  out = str(tmp_path / "out")
  summary = curate.curate([str(src)], out, chunk=4, progress=False)
  assert summary == {"read": 9, "kept": 1, "written": 1, "dropped": {
      "bad_aspect": 1, "caption_too_short": 1, "exact_duplicate": 1, "few_letters": 1,
      "flat_image": 1, "malformed_record": 1, "too_small": 1, "truncated_image": 1}}
  rows = table(out)
  assert [r["reason"] for r in rows] == [None, "too_small", "bad_aspect", "flat_image",
                                         "caption_too_short", "few_letters", "truncated_image",
                                         "exact_duplicate", "malformed_record"]
  assert rows[7]["duplicate_of"] == f"{src}:0" and rows[0]["decision"] == "keep"
  assert rows[0]["width"] == 16 and rows[0]["std"] > 50 and rows[3]["std"] == 0
  assert [records.unpack(r)["segments"][0]["text"] for r in read_back(out)] == [
      "a red circle at the top"]
  info = records.read_info(out)
  assert info["documents"] == 1 and info["curation"] == summary


def test_jpeg_quality_estimate():
  from PIL import Image
  import io
  for q in (30, 75, 95):
    data = fx.encode_jpeg(scene(0, 32, 32), quality=q)
    assert abs(curate.jpeg_quality(Image.open(io.BytesIO(data))) - q) <= 2
  assert curate.jpeg_quality(Image.open(io.BytesIO(fx.encode_png(scene(0))))) is None


def test_dedup_finds_planted_duplicates_across_folders(tmp_path):
  truth = curate.corrupt(str(tmp_path / "raw"), n=60, rate=0.3, seed=1)
  assert sum(truth["counts"].values()) == 18 and len(truth["faults"]) == 18
  out = str(tmp_path / "out")
  curate.curate([str(tmp_path / "raw")], out, chunk=25, progress=False)
  result = curate.measure(out, str(tmp_path / "raw" / curate.FAULTS_FILE))
  for kind in ("near_duplicate", "exact_duplicate", "flat_image"):
    assert result[kind]["precision"] >= 0.95 and result[kind]["recall"] >= 0.95, (kind, result)
  assert result["wrong_caption"]["flagged"] == 0  # caption_mismatch needs a judge
  # A second folder repeating the first: duplicates are found across folders, the first kept.
  curate.corrupt(str(tmp_path / "copy"), n=60, rate=0.3, seed=1)
  both = curate.curate([str(tmp_path / "raw"), str(tmp_path / "copy")], str(tmp_path / "both"),
                       chunk=25, progress=False)
  assert both["kept"] == len(read_back(out)) and both["read"] == 120


def test_resume_after_an_interruption_writes_each_record_once(tmp_path):
  curate.corrupt(str(tmp_path / "raw"), n=40, rate=0.3, seed=2, image_size=16)
  once, stopped = str(tmp_path / "once"), str(tmp_path / "stopped")
  full = curate.curate([str(tmp_path / "raw")], once, chunk=10, progress=False)
  part = curate.curate([str(tmp_path / "raw")], stopped, chunk=10, stop_after=2, progress=False)
  assert part["finished"] is False and part["read"] == 20
  assert not os.path.exists(os.path.join(stopped, records.INFO_FILE))
  # a chunk cut short: its shard half-written, then the run starts again
  with open(os.path.join(stopped, "docs-00002.array_record.tmp"), "wb") as f:
    f.write(b"partial")
  again = curate.curate([str(tmp_path / "raw")], stopped, chunk=10, progress=False)
  assert again == full
  assert read_back(stopped) == read_back(once)
  rows = table(stopped)
  assert [r["record"] for r in rows] == list(range(40))
  assert curate.curate([str(tmp_path / "raw")], stopped, chunk=10, progress=False) == full
  with pytest.raises(UserError, match="other inputs or settings"):
    curate.curate([str(tmp_path / "raw")], stopped, chunk=5, progress=False)
  with pytest.raises(UserError, match="also an --input"):
    curate.curate([str(tmp_path / "raw")], str(tmp_path / "raw"), progress=False)
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("x")
  with pytest.raises(UserError, match="not empty"):
    curate.curate([str(tmp_path / "raw")], str(tmp_path / "busy"), progress=False)


def test_cli_prints_one_json_summary_line(tmp_path, capsys):
  raw, out = str(tmp_path / "raw"), str(tmp_path / "out")
  curate.main(["corrupt", "--output", raw, "--n", "30", "--rate", "0.2", "--image-size", "16"])
  capsys.readouterr()
  curate.main(["--input", raw, "--output", out, "--min-letter-share", "0.6", "--chunk", "7"])
  last = capsys.readouterr().out.strip().splitlines()[-1]
  summary = json.loads(last)
  assert set(summary) == {"read", "kept", "dropped", "written"} and summary["read"] == 30
  assert summary["kept"] + sum(summary["dropped"].values()) == 30
  assert records.read_info(out)["filters"]["min_letter_share"] == 0.6
  curate.main(["measure", "--output", out, "--truth", os.path.join(raw, curate.FAULTS_FILE)])
  assert "near_duplicate" in json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  with pytest.raises(UserError, match="--chunk must be >= 1"):
    curate.main(["--input", raw, "--output", str(tmp_path / "x"), "--chunk", "0"])
