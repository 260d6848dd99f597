"""The training data stream over converted sources: mixture, aspect buckets,
skip counting and the error threshold, resume (same / other worker count),
and sharding over processes."""

import io
import os
import re

import grain
import jax
import numpy as np
import pytest
from PIL import Image

from helpers import tiny_config
from unimm.data import document as D
from unimm.data import records
from unimm.data.document import CLEAN_IMAGE, NOISED_IMAGE, TEXT
from unimm.data.pipeline import (COUNT_WIDTH, SKIP_REASONS, _Chunks, caption_pair,
                                 document_stream, encode_document, make_iterator, parse_mixture,
                                 split_document, unstack)
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.image_grid import PixelPatches


def png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def pair(i, h=16, w=16, image=None):
  """A converted text-to-image pair whose text starts with its id '#i '."""
  if image is None:
    image = png(np.full((h, w, 3), (i * 7) % 256, np.uint8))
  return {"task": "t2i", "segments": [
      {"kind": "text", "text": f"#{i} a picture", "loss": True},
      {"kind": "image", "bytes": image, "role": "target"}], "meta": {"id": i}}


def write_source(directory, docs, raw=(), docs_per_shard=7):
  """A converted folder: `docs` packed, plus `raw` records as they are."""
  w = records.ShardWriter(str(directory), docs_per_shard=docs_per_shard)
  for doc in docs:
    w.write(doc)
  for r in raw:  # bypass pack: malformed records
    w._writer.write(r)  # pylint: disable=protected-access
  w.close({"format": "test"})
  return str(directory)


def cfg_for(mixture, **over):
  cfg = tiny_config(**{"data.mixture": mixture, "data.seq_len": 96, "data.batch_size": 4,
                       "data.pack_bins": 4, "data.pair_caption_prob": 0.0,
                       "data.cfg_dropout": 0.0, **over})
  return cfg


def packed(batch, tok):
  """(id, row, mask) of each document packed in a batch (ids '#i' of pair())."""
  for r in range(batch["tokens"].shape[0]):
    for s in sorted(set(batch["segment_ids"][r].tolist()) - {0}):
      sel = batch["segment_ids"][r] == s
      ids = batch["tokens"][r][sel & (batch["modality"][r] == TEXT)].tolist()
      m = re.match(r"#(\d+) ", tok.decode([t for t in ids if t not in tok.special_ids]))
      yield (int(m.group(1)) if m else None), r, sel


def doc_ids(batch, tok):
  return [i for i, _, _ in packed(batch, tok)]


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("byte")


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory):
  return write_source(tmp_path_factory.mktemp("pairs"), [pair(i) for i in range(40)])


def test_parse_mixture():
  assert parse_mixture("shapes") == [("shapes", "shapes", 1.0)]
  assert parse_mixture("shapes:0.7, /d/pairs:0.3,/e/pairs") == [
      ("shapes", "shapes", 0.7), ("pairs", "/d/pairs", 0.3), ("pairs_2", "/e/pairs", 1.0)]
  for bad in ("", "shapes:0", "shapes:-1"):
    with pytest.raises(UserError):
      parse_mixture(bad)


def test_missing_source_is_one_line_error(tmp_path):
  with pytest.raises(UserError, match="holds no docs-"):
    make_iterator(cfg_for(f"shapes,{tmp_path}"))


def test_mixture_follows_weights(pairs_dir, tok):
  it = make_iterator(cfg_for(f"shapes:3,{pairs_dir}:1"))
  for _ in range(12):
    next(it)
  m = it.metrics()
  name = os.path.basename(pairs_dir)
  share = m[f"data/read/{name}"] / (m[f"data/read/{name}"] + m["data/read/shapes"])
  assert abs(share - 0.25) < 0.08, m
  it.close()


def test_converted_pairs_stream_exactly(pairs_dir, tok):
  """Every document of a converted folder arrives whole, its image decoded."""
  it = make_iterator(cfg_for(pairs_dir))
  batch = next(it)
  ids = doc_ids(batch, tok)
  assert ids and None not in ids and len(set(ids)) == len(ids)
  for i, r, sel in packed(batch, tok):
    img = sel & (batch["modality"][r] == NOISED_IMAGE)
    assert img.sum() == PixelPatches(16, 8).num_patches
    np.testing.assert_allclose(batch["patches"][r][img], (i * 7) % 256 / 127.5 - 1.0, atol=1e-6)
  it.close()


def test_aspect_ratio_buckets(tmp_path, tok):
  """Wide and tall photos land in 3x5 / 5x3 patch grids, squares in 4x4, each
  resized to cover and centre-cropped; patch_index = row * max_cols + col."""
  wide = np.zeros((30, 60, 3), np.uint8)
  wide[:, 20:40] = 255  # a white band in the middle survives the crop
  docs = [pair(0, image=png(wide)), pair(1, h=60, w=30), pair(2, h=33, w=31)]
  src = write_source(tmp_path / "photos", docs)
  cfg = cfg_for(src, **{"data.image_size": 32, "data.max_aspect": 2.0, "data.seq_len": 128})
  it = make_iterator(cfg)
  batch = next(it)
  grids = {}
  for i, r, sel in packed(batch, tok):
    img = sel & (batch["modality"][r] == NOISED_IMAGE)
    grids[i] = (int(img.sum()), batch["patch_index"][r][img], batch["patches"][r][img])
  assert grids[0][0] == 15 and grids[1][0] == 15 and grids[2][0] == 16
  np.testing.assert_array_equal(grids[0][1], [r * 5 + c for r in range(3) for c in range(5)])
  np.testing.assert_array_equal(grids[1][1], [r * 5 + c for r in range(5) for c in range(3)])
  np.testing.assert_array_equal(grids[2][1], [r * 5 + c for r in range(4) for c in range(4)])
  image = PixelPatches(32, 8, max_aspect=2.0).decode(grids[0][2], grid=(3, 5))
  assert image.shape == (24, 40, 3)
  assert image[:, 14:26].min() > 200 and image[:, :10].max() < 50 and image[:, 30:].max() < 50
  it.close()


def test_bad_records_are_counted_by_reason(tmp_path):
  good = [pair(i) for i in range(60)]
  bad = [pair(100, image=b"not an image"), pair(101, image=b""),
         pair(102, image=png(np.random.default_rng(0).integers(0, 255, (16, 16, 3), np.uint8))[:60])]
  src = write_source(tmp_path / "mixed", good + bad, raw=[b"\x00garbage"])
  it = make_iterator(cfg_for(src, **{"data.max_error_rate": 0.2}))
  for _ in range(40):
    next(it)
  m = it.metrics()
  epochs = m["data/read/mixed"] // 64
  assert epochs >= 2
  for reason in ("undecodable_image", "empty_image", "truncated_image", "malformed_record"):
    assert m[f"data/skipped/mixed/{reason}"] >= epochs, (reason, m)
  assert set(k.split("/")[-1] for k in m if k.startswith("data/skipped")) <= set(SKIP_REASONS)
  it.close()


def test_error_rate_threshold_names_source_and_reason(tmp_path):
  docs = [pair(i) for i in range(10)] + [pair(100 + i, image=b"junk") for i in range(30)]
  src = write_source(tmp_path / "broken", docs)
  it = make_iterator(cfg_for(f"shapes:1,{src}:1", **{"data.error_min_records": 20}))
  with pytest.raises(UserError, match=r"data source 'broken': .*most common reason: "
                                      r"undecodable_image"):
    for _ in range(50):
      next(it)
  it.close()


def test_too_long_documents_stop_with_the_seq_len_hint():
  it = make_iterator(tiny_config(**{"data.seq_len": 24, "data.error_min_records": 20}))
  with pytest.raises(UserError, match=r"too_long .*data.seq_len is 24"):
    next(it)
  it.close()


def take_ids(it, n, tok):
  return [doc_ids(next(it), tok) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_reads_exactly_the_uninterrupted_stream(pairs_dir, tok, workers):
  cfg = cfg_for(f"shapes:1,{pairs_dir}:1", **{"data.num_workers": workers,
                                              "data.cfg_dropout": 0.3,
                                              "data.pair_caption_prob": 0.3})
  it = make_iterator(cfg)
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(3)]
  it.close()
  again = make_iterator(cfg)
  again.set_state(state)
  got = [next(again) for _ in range(3)]
  for a, b in zip(want, got):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert again.metrics() == it.metrics()
  again.close()


def test_resume_with_other_worker_count_is_a_clear_error(pairs_dir):
  it = make_iterator(cfg_for(pairs_dir))
  next(it)
  state = it.get_state()
  it.close()
  other = make_iterator(cfg_for(pairs_dir, **{"data.num_workers": 1}))
  with pytest.raises(UserError, match=r"data.num_workers=0 but this run has 1.*"
                                      r"--config.data.num_workers=0"):
    other.set_state(state)
  changed = make_iterator(cfg_for(f"shapes,{pairs_dir}"))
  with pytest.raises(UserError, match="same data.mixture"):
    changed.set_state(state)


@pytest.mark.parametrize("num_records", [40, 41])
def test_two_processes_read_each_record_once_per_epoch(tmp_path, tok, num_records):
  """Two simulated processes: their first epoch's reads partition the source."""
  src = write_source(tmp_path / "ids", [pair(i) for i in range(num_records)])
  cfg = cfg_for(src)
  reads = []
  for p in range(2):
    stream = iter(document_stream(cfg, shard=p, shards=2))
    share = (num_records - p + 1) // 2  # records p, p + 2, ... of the shuffled epoch
    docs = [unstack(next(stream)) for _ in range(share)]
    reads.append([doc_ids({"tokens": d["tokens"][None], "modality": d["modality"][None],
                           "segment_ids": np.ones((1, len(d["tokens"])), np.int32)}, tok)[0]
                  for d in docs])
    stream.close()
  assert not set(reads[0]) & set(reads[1])
  assert sorted(reads[0] + reads[1]) == list(range(num_records))


def test_two_processes_fill_the_global_batch_on_8_devices(pairs_dir, tok):
  """Each of 2 processes packs its half of the global batch from disjoint
  records; on an 8-device data mesh, devices 0-3 hold process 0's rows."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  assert len(jax.devices()) == 8
  cfg = cfg_for(pairs_dir, **{"data.batch_size": 8})
  halves = [next(make_iterator(cfg, process_index=p, process_count=2)) for p in range(2)]
  ids = [set(doc_ids(h, tok)) for h in halves]
  assert ids[0] and ids[1] and not ids[0] & ids[1]
  mesh = Mesh(np.array(jax.devices()), ("data",))
  tokens = jax.device_put(np.concatenate([h["tokens"] for h in halves]),
                          NamedSharding(mesh, P("data")))
  for shard in tokens.addressable_shards:
    row = shard.index[0].start
    want = halves[row // 4]["tokens"][row % 4:row % 4 + 1]
    np.testing.assert_array_equal(np.asarray(shard.data), want)


def test_decode_applies_exif_orientation_and_buckets():
  """A phone JPEG stored landscape with EXIF 'rotate 90' comes out portrait,
  in the tall bucket."""
  img = np.zeros((20, 40, 3), np.uint8)
  img[:, :20] = 255  # left half white: after rotating 90 degrees clockwise, the top half
  exif = Image.Exif()
  exif[records.ORIENTATION] = 6
  buf = io.BytesIO()
  Image.fromarray(img).save(buf, format="JPEG", exif=exif, quality=95)
  patcher = PixelPatches(32, 8, max_aspect=2.0)
  out = records.decode_image(buf.getvalue(), bucket=patcher.bucket_size)
  assert out.shape == (40, 24, 3)
  assert out[:15].mean() > 200 and out[25:].mean() < 50
  plain = records.decode_image(png(img), bucket=patcher.bucket_size)
  assert plain.shape == (24, 40, 3)


@pytest.mark.parametrize("fmt", ["img2dataset", "webdataset", "tfds", "instructpix2pix",
                                 "hq_edit", "mmc4", "obelics", "omnigen"])
def test_every_format_converts_and_streams(tmp_path, tok, fmt):
  """A sample file of each public format -> convert -> the training stream."""
  from unimm.data import bench, convert  # pylint: disable=import-outside-toplevel
  argv = bench.write_input(fmt, str(tmp_path), 4)
  out = str(tmp_path / "converted")
  summary = convert.main(["--format", fmt, "--output", out, *argv])
  images_per_doc = {"mmc4": 2, "obelics": 2, "omnigen": 3, "instructpix2pix": 2, "hq_edit": 2}
  assert summary == {"documents": 4, "images": 4 * images_per_doc.get(fmt, 1), "skipped": {},
                     "repaired": {}}
  cfg = cfg_for(out, **{"data.image_size": 32, "data.seq_len": 512, "data.max_aspect": 2.0})
  it = make_iterator(cfg)
  batch = next(it)
  assert it.metrics()[f"data/read/{os.path.basename(out)}"] >= 4
  assert not any(k.startswith("data/skipped") for k in it.metrics())
  images = batch["modality"] != TEXT
  assert images.any() and (batch["loss_mask"] > 0).any()
  assert batch["patch_index"][images].max() < 25  # 5 x 5 table: buckets 3x5, 4x4, 5x3
  it.close()


def test_pairs_read_as_captions_at_pair_caption_prob(pairs_dir, tok):
  doc = caption_pair({**pair(3), "segments": [
      {"kind": "text", "text": "#3 a picture", "loss": False},
      {"kind": "image", "image": np.zeros((16, 16, 3), np.uint8), "role": "target"}]})
  assert doc["task"] == "caption"
  assert [s.get("role", s["kind"]) for s in doc["segments"]] == ["condition", "text"]
  assert doc["segments"][1]["loss"] is True
  for prob, want in ((0.0, NOISED_IMAGE), (1.0, CLEAN_IMAGE)):
    it = make_iterator(cfg_for(pairs_dir, **{"data.pair_caption_prob": prob}))
    batch = next(it)
    images = batch["modality"][batch["modality"] != TEXT]
    assert images.size and (images == want).all(), prob
    it.close()


# ------------------------------------------------------------ long documents


def story(i, images=6, size=16):
  """A converted interleaved document: '#i' then text, image, text, image, ..."""
  segs = [{"kind": "text", "text": f"#{i} part 0", "loss": True}]
  for k in range(images):
    segs += [{"kind": "image", "bytes": png(np.full((size, size, 3), k * 30, np.uint8)),
              "role": "condition"},
             {"kind": "text", "text": f"#{i} part {k + 1}", "loss": True}]
  return {"task": "interleaved", "segments": segs, "meta": {"id": i}}


def test_long_interleaved_documents_split_at_segment_boundaries(tok):
  patcher = PixelPatches(16, 8)
  img = np.zeros((16, 16, 3), np.uint8)
  segs = [D.text("a title")] + [s for k in range(5) for s in (D.image(img), D.text(f"t{k}"))]
  doc = D.document("interleaved", segs)
  assert len(encode_document(doc, tok, patcher)["tokens"]) > 40
  chunks = split_document(doc, tok, patcher, 40)
  assert len(chunks) > 1
  assert [s for c in chunks for s in c["segments"]] == segs  # all segments, in order
  for c in chunks:
    assert len(encode_document(c, tok, patcher)["tokens"]) <= 40
    assert c["segments"][0]["kind"] == "text" and c["task"] == "interleaved"
  short = D.document("interleaved", [D.text("ab"), D.image(img), D.text("cd")])
  with pytest.raises(records.Skip, match="segment 1 .* needs 8 .*data.seq_len is 7") as e:
    split_document(short, tok, patcher, 7)  # an image alone: <bos> <boi> 4 patches <eoi> <eos>
  assert e.value.reason == "too_long"


def test_long_interleaved_records_are_split_counted_and_resume(tmp_path, tok):
  """seq_len 40 holds about two of a story's 6 images: each record becomes several documents,
  counted once as read and once as split (not too_long), keeping its origin; a state saved
  in the middle of a split record resumes at the next chunk."""
  folder = write_source(tmp_path / "mmc4", [story(i) for i in range(6)])
  cfg = cfg_for(folder, **{"data.seq_len": 40, "data.batch_size": 2, "data.pack_bins": 1,
                           "data.error_min_records": 1})
  it = make_iterator(cfg)
  seen = []
  for _ in range(11):  # 22 documents: a record has 4 chunks, the state falls inside one
    batch = next(it)
    assert batch["tokens"].shape == (2, 40)
    seen += [i for i in doc_ids(batch, tok) if i is not None]
  assert set(seen) == set(range(6))
  m = it.metrics()
  name = os.path.basename(folder)
  assert not any(k.startswith("data/skipped") for k in m)
  assert 0 < m[f"data/split/{name}"] == m[f"data/read/{name}"]
  assert len(it.origins) == 2 and all(k == 0 for k, _ in it.origins)
  state = it.get_state()
  assert "'chunk': 2" in str(state)
  want = [doc_ids(next(it), tok) for _ in range(3)]
  it.close()
  again = make_iterator(cfg)
  again.set_state(state)
  assert [doc_ids(next(again), tok) for _ in range(3)] == want
  again.close()


def test_counts_saved_before_the_split_column_restore(pairs_dir):
  it = make_iterator(cfg_for(pairs_dir))
  next(it)
  state = it.get_state()
  shard = state["shard_states"]["0"]
  shard["counts"] = [row[:len(SKIP_REASONS) + 1] for row in shard["counts"]]  # an older save
  again = make_iterator(cfg_for(pairs_dir))
  again.set_state(state)
  assert again.counts.shape == (1, COUNT_WIDTH) and again.counts[0, -1] == 0
  assert again.metrics() == it.metrics()
  shard["counts"] = [[1, 2]]
  with pytest.raises(UserError, match=r"data counts have shape \[1, 2\]"):
    again.set_state(state)
  it.close()
  again.close()


def test_chunks_state_inside_a_split_record_resumes_at_its_next_chunk():
  elements = [{"x": 0, "source": 0}, {"chunks": [{"x": 1}, {"x": 2}, {"x": 3}], "source": 0},
              {"x": 4, "source": 0}]
  ds = _Chunks(grain.MapDataset.source(elements).to_iter_dataset())
  it = iter(ds)
  assert [next(it)["x"] for _ in range(2)] == [0, 1]
  state = it.get_state()
  assert "chunk" in state
  rest = [(e["x"], e.get("part")) for e in it]
  assert rest == [(2, 1), (3, 2), (4, None)]
  again = iter(ds)
  again.set_state(state)
  assert [(e["x"], e.get("part")) for e in again] == rest
  old = iter(ds)  # a state without "chunk" (as saved before splitting existed)
  old.set_state({"next_index": 2})
  assert [e["x"] for e in old] == [4]
