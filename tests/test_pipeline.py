"""Tests for unimm.data.pipeline: encoding, dropout, packing, batches, state."""

import json
import re
import types

import ml_collections
import numpy as np
import pytest
from etils import epath

from unimm.data import document as D
from unimm.data.document import CLEAN_IMAGE, NOISED_IMAGE, TEXT
from unimm.data.pipeline import (BATCH_KEYS, FEATURES, condition_dropout,
                                 encode_document, make_iterator,
                                 validate_batch)
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.image_grid import PixelPatches

WORDS = ("red green blue circle square triangle left right above below big "
         "small the a of").split()
TASKS = ("t2i", "caption", "qa", "edit", "story")


class FakeSource:
  """Random documents of every task layout, deterministic from (seed, i).

  Each document starts with the text tag "#i " (no loss), so a packed
  document can be traced back to its record.
  """

  def __init__(self, seed=0, image_size=16, num_records=1000):
    self.seed, self.image_size, self.num_records = seed, image_size, num_records

  def __len__(self):
    return self.num_records

  def __getitem__(self, i):
    rng = np.random.default_rng([self.seed, i])
    size = self.image_size

    def img():
      return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    def words():
      return " ".join(rng.choice(WORDS, rng.integers(1, 6)))

    tag = D.text(f"#{i} ", loss=False)
    task = TASKS[int(rng.integers(len(TASKS)))]
    if task == "t2i":
      segs = [tag, D.text(words(), False), D.image(img(), "target")]
    elif task == "caption":
      segs = [tag, D.image(img()), D.text(words())]
    elif task == "qa":
      segs = [tag, D.image(img()), D.text(words() + "?", False), D.text(words())]
    elif task == "edit":
      segs = [tag, D.image(img()), D.text(words(), False),
              D.image(img(), "target")]
    else:
      segs = [tag, D.text(words()), D.image(img(), "target"), D.text(words()),
              D.image(img(), "target")]
    return D.document(task, segs, {"index": int(i)})


def make_cfg(**data):
  """A small config: 16px images, 4px patches (16 patches of 48 values)."""
  cfg = ml_collections.ConfigDict()
  cfg.seed = 0
  cfg.data = dict(
      image_size=16, seq_len=160, batch_size=4, tasks={t: 1.0 for t in TASKS},
      two_object_prob=0.3, cfg_dropout=0.0, tokenizer="byte", num_workers=0,
      pack_bins=4)
  cfg.data.update(data)
  cfg.model = dict(patch_size=4)
  return cfg


@pytest.fixture(scope="module")
def tok():
  return load_tokenizer("byte")


@pytest.fixture(scope="module")
def patcher():
  return PixelPatches(4, 2)  # 4 patches of 2x2x3 = 12 values


def tiny_image(seed=0, size=4):
  return np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def packed_docs(batch):
  """Yields (row, positions, {feature: array}) for every packed document."""
  for r, seg in enumerate(batch["segment_ids"]):
    for s in np.unique(seg[seg > 0]):
      idx = np.flatnonzero(seg == s)
      yield r, idx, {k: batch[k][r, idx] for k in FEATURES}


def record_index(doc, tok):
  """The FakeSource record a packed document came from (its '#i' tag)."""
  tokens = doc["tokens"]
  end = int(np.argmax(doc["modality"] != TEXT)) or len(tokens)
  m = re.match(r"#(\d+) ", tok.decode(tokens[1:end]))
  assert m, tok.decode(tokens)
  return int(m.group(1))


# ------------------------------------------------------------ encode_document


def test_encode_caption_exact(tok, patcher):
  img = tiny_image()
  doc = D.document("caption", [D.text("hi", loss=False), D.image(img),
                               D.text("ok")])
  out = encode_document(doc, tok, patcher)
  h, i, o, k = tok.encode("hiok")
  bos, boi, eoi, eos, pad = (tok.bos_id, tok.boi_id, tok.eoi_id, tok.eos_id,
                             tok.pad_id)
  np.testing.assert_array_equal(
      out["tokens"], [bos, h, i, boi, pad, pad, pad, pad, eoi, o, k, eos])
  np.testing.assert_array_equal(
      out["targets"], [h, i, boi, pad, pad, pad, pad, eoi, o, k, eos, pad])
  np.testing.assert_array_equal(
      out["loss_mask"], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(
      out["modality"], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(
      out["image_ids"], [0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(
      out["patch_index"], [0, 0, 0, 0, 0, 1, 2, 3, 0, 0, 0, 0])
  want_patches = np.zeros((12, 12), np.float32)
  want_patches[4:8] = patcher.encode(img)
  np.testing.assert_array_equal(out["patches"], want_patches)
  assert out["pixels"].shape == (12, 0) and not out["encode"].any()  # nothing to encode
  assert {k: v.dtype for k, v in out.items()} == {
      "tokens": np.int32, "targets": np.int32, "loss_mask": np.float32,
      "patches": np.float32, "modality": np.int32, "image_ids": np.int32,
      "patch_index": np.int32, "pixels": np.uint8, "encode": np.int32}


def test_encode_t2i_exact(tok, patcher):
  doc = D.document("t2i", [D.text("a", loss=False),
                           D.image(tiny_image(), "target")])
  out = encode_document(doc, tok, patcher)
  (a,) = tok.encode("a")
  bos, boi, eoi, eos, pad = (tok.bos_id, tok.boi_id, tok.eoi_id, tok.eos_id,
                             tok.pad_id)
  np.testing.assert_array_equal(
      out["tokens"], [bos, a, boi, pad, pad, pad, pad, eoi, eos])
  # a -> <boi> is predicted (target image); <eoi> -> <eos> (ends in target).
  np.testing.assert_array_equal(out["loss_mask"], [0, 1, 0, 0, 0, 0, 0, 1, 0])
  np.testing.assert_array_equal(out["modality"], [0, 0, 0, 2, 2, 2, 2, 0, 0])


def test_encode_story_two_images(tok, patcher):
  doc = D.document("story", [
      D.text("x"), D.image(tiny_image(1), "target"), D.text("y", loss=False),
      D.image(tiny_image(2))])
  out = encode_document(doc, tok, patcher)
  # bos x boi P*4 eoi y boi P*4 eoi eos
  assert len(out["tokens"]) == 16
  np.testing.assert_array_equal(
      out["image_ids"], [0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 2, 2, 2, 2, 0, 0])
  np.testing.assert_array_equal(
      out["modality"],
      [0, 0, 0] + [NOISED_IMAGE] * 4 + [0, 0, 0] + [CLEAN_IMAGE] * 4 + [0, 0])
  # bos->x (loss), x-><boi> (target), eoi->y (no loss), y-><boi> (condition),
  # <eoi>-><eos>: last text had no loss and the doc ends in a condition image.
  np.testing.assert_array_equal(
      out["loss_mask"], [1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out["patches"][3:7], patcher.encode(tiny_image(1)))
  np.testing.assert_array_equal(out["patches"][10:14],
                                patcher.encode(tiny_image(2)))


def test_encode_without_eos(tok, patcher):
  doc = D.document("qa", [D.text("q", loss=False), D.text("a")])
  out = encode_document(doc, tok, patcher, add_eos=False)
  np.testing.assert_array_equal(out["tokens"], [tok.bos_id] + tok.encode("qa"))
  np.testing.assert_array_equal(out["loss_mask"], [0, 1, 0])
  assert out["patches"].shape == (3, 12)


@pytest.mark.parametrize("image, match", [
    (tiny_image(size=8), r"task 'edit'.* segment 1 .*shape \(8, 8, 3\)"),
    (tiny_image()[..., :1], r"task 'edit'.* segment 1 .*shape \(4, 4, 1\)"),
    (tiny_image().astype(np.float32), r"segment 1 .*dtype float32.*uint8"),
])
def test_encode_bad_image(tok, patcher, image, match):
  doc = D.document("edit", [D.text("t"), {"kind": "image", "image": image,
                                          "role": "condition"}])
  with pytest.raises(UserError, match=match):
    encode_document(doc, tok, patcher)


def test_encode_too_long_and_bad_kind(tok, patcher):
  doc = D.document("caption", [D.image(tiny_image()), D.text("a" * 20)])
  assert len(encode_document(doc, tok, patcher, seq_len=28)["tokens"]) == 28
  with pytest.raises(UserError, match=r"needs 28 positions.*raise data.seq_len"):
    encode_document(doc, tok, patcher, seq_len=27)
  with pytest.raises(UserError, match="segment 0 has kind 'audio'"):
    encode_document(D.document("x", [{"kind": "audio"}]), tok, patcher)


# ---------------------------------------------------------- condition_dropout


def test_condition_dropout_drops_text_before_first_target():
  cond, tgt, tgt2 = tiny_image(1), tiny_image(2), tiny_image(3)
  doc = D.document("edit", [D.text("a"), D.image(cond), D.text("b"),
                            D.image(tgt, "target"), D.text("c"),
                            D.image(tgt2, "target")])
  out = condition_dropout(doc, np.random.default_rng(0), 1.0)
  assert [s["kind"] for s in out["segments"]] == [
      "image", "image", "text", "image"]
  assert out["segments"][0]["image"] is cond
  assert out["segments"][2]["text"] == "c"
  assert out["meta"]["cfg_dropped"] and "cfg_dropped" not in doc["meta"]
  assert len(doc["segments"]) == 6  # input untouched
  assert condition_dropout(doc, np.random.default_rng(0), 0.0) is doc
  caption = D.document("caption", [D.image(cond), D.text("x")])
  assert condition_dropout(caption, np.random.default_rng(0), 1.0) is caption


def test_condition_dropout_frequency():
  doc = D.document("t2i", [D.text("p", False), D.image(tiny_image(), "target")])
  p, n = 0.3, 4000
  dropped = [condition_dropout(doc, np.random.default_rng(k), p) is not doc
             for k in range(n)]
  assert abs(np.mean(dropped) - p) < 4 * np.sqrt(p * (1 - p) / n)
  again = [condition_dropout(doc, np.random.default_rng(k), p) is not doc
           for k in range(n)]
  assert dropped == again


def test_pipeline_applies_dropout(tok):
  it = make_iterator(make_cfg(cfg_dropout=1.0), source=FakeSource())
  seen = 0
  for _, _, doc in packed_docs(next(it)):
    noised = np.flatnonzero(doc["modality"] == NOISED_IMAGE)
    if len(noised):
      seen += 1
      before = doc["tokens"][:noised[0]][doc["modality"][:noised[0]] == TEXT]
      assert set(before.tolist()) <= {tok.bos_id, tok.boi_id, tok.eoi_id}
  assert seen


# ----------------------------------------------------------------- batching


def test_batch_contract():
  cfg = make_cfg()
  batch = next(make_iterator(cfg, source=FakeSource()))
  assert sorted(batch) == sorted(BATCH_KEYS)
  validate_batch(batch, seq_len=160, patch_dim=48, batch_size=4)


def test_attribute_config_works():
  cfg = make_cfg()
  ns = types.SimpleNamespace(
      seed=cfg.seed, data=types.SimpleNamespace(**cfg.data.to_dict()),
      model=types.SimpleNamespace(patch_size=4))
  a = take(make_iterator(ns, source=FakeSource()), 2)
  b = take(make_iterator(cfg, source=FakeSource()), 2)
  assert_batches_equal(a, b)


def test_packing_invariants(tok):
  source = FakeSource()
  patcher = PixelPatches(16, 4)
  it = make_iterator(make_cfg(), source=source)
  num_docs = 0
  for batch in take(it, 3):
    seg, pos = batch["segment_ids"], batch["positions"]
    pad = seg == 0
    assert pad.any() and not pad.all()
    for k in ("loss_mask", "modality", "image_ids", "patch_index", "positions"):
      assert not batch[k][pad].any(), k
    assert not batch["patches"][pad].any()
    assert (batch["tokens"][pad] == tok.pad_id).all()
    for row in seg:  # ids 1..k in order, padding only at the end
      ids = row[row > 0]
      assert (np.diff(ids) >= 0).all() and ids[0] == 1
      assert set(ids) == set(range(1, ids[-1] + 1))
      assert (row[len(ids):] == 0).all()
    for r, idx, doc in packed_docs(batch):
      num_docs += 1
      assert (np.diff(idx) == 1).all()  # contiguous
      np.testing.assert_array_equal(pos[r, idx], np.arange(len(idx)))
      # The whole document, unsplit, exactly as encoded alone.
      want = encode_document(source[record_index(doc, tok)], tok, patcher)
      for k in FEATURES:
        np.testing.assert_array_equal(doc[k], want[k], err_msg=k)
  assert num_docs > 3 * 4


def test_deterministic_for_seed():
  a = take(make_iterator(make_cfg(cfg_dropout=0.5), source=FakeSource()), 3)
  b = take(make_iterator(make_cfg(cfg_dropout=0.5), source=FakeSource()), 3)
  assert_batches_equal(a, b)
  cfg = make_cfg(cfg_dropout=0.5)
  cfg.seed = 1
  c = take(make_iterator(cfg, source=FakeSource()), 1)
  assert not np.array_equal(a[0]["tokens"], c[0]["tokens"])


def test_processes_read_disjoint_records(tok):
  cfg = make_cfg(batch_size=8)
  seen = []
  for index in range(2):
    it = make_iterator(cfg, process_index=index, process_count=2,
                       source=FakeSource())
    records = []
    for batch in take(it, 3):
      assert batch["tokens"].shape == (4, 160)
      records += [record_index(doc, tok) for _, _, doc in packed_docs(batch)]
    assert len(records) == len(set(records))
    seen.append(set(records))
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def _global_batch(cfg, process_count, states=None):
  """Next global batch read by `process_count` processes (their iterators' rows concatenated
  in process order), each process first restored from `states` if given; and the iterators."""
  its = [make_iterator(cfg, process_index=i, process_count=process_count, source=FakeSource())
         for i in range(process_count)]
  for it in its:
    if states is not None:
      it.set_state(states)
  parts = [next(it) for it in its]
  return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}, its


def test_fixed_data_shards_read_the_same_global_batches_on_any_process_count(tok, tmp_path):
  """data.shards=4: 1, 2 or 4 processes read the same global batches of distinct records,
  and a data state saved by 2 processes resumes on 1 and on 4 (checkpoint files merged)."""
  from unimm.train.checkpoint import merged_data_state
  cfg = make_cfg(batch_size=8, shards=4)
  first, two = _global_batch(cfg, 2)
  records = [record_index(doc, tok) for _, _, doc in packed_docs(first)]
  assert len(records) == len(set(records)) > 8
  for count in (1, 4):
    assert_batches_equal([_global_batch(cfg, count)[0]], [first])
  for i, it in enumerate(two):  # the files two processes write, merged as a restore reads them
    (tmp_path / f"process_{i}-of-2.json").write_text(json.dumps(it.get_state()))
  state = merged_data_state(epath.Path(tmp_path))
  parts = [next(it) for it in two]
  following = {k: np.concatenate([p[k] for p in parts]) for k in first}
  for count in (1, 4):
    assert_batches_equal([_global_batch(cfg, count, state)[0]], [following])
  with pytest.raises(UserError, match="read as 4 data shards and this run reads 2: resume with "
                                      "--config.data.shards=4"):
    make_iterator(make_cfg(batch_size=8), process_count=2, source=FakeSource()).set_state(state)
  with pytest.raises(UserError, match="data.shards=4 does not divide over 3 processes"):
    make_iterator(cfg, process_index=0, process_count=3, source=FakeSource())
  (tmp_path / "process_0-of-2.json").unlink()
  with pytest.raises(UserError, match="incomplete"):
    merged_data_state(epath.Path(tmp_path))


def test_repeats_past_one_epoch(tok):
  it = make_iterator(make_cfg(), source=FakeSource(num_records=5))
  records = [record_index(doc, tok) for batch in take(it, 3)
             for _, _, doc in packed_docs(batch)]
  assert len(records) > 10 and set(records) == set(range(5))


def test_global_batch_must_divide():
  with pytest.raises(UserError, match="data.batch_size 6 .* multiple of 4"):
    make_iterator(make_cfg(batch_size=6), process_count=4, source=FakeSource())


def test_state_round_trip():
  cfg = make_cfg(cfg_dropout=0.3)
  it = make_iterator(cfg, source=FakeSource())
  take(it, 3)
  state = it.get_state()
  want = take(it, 4)
  it2 = make_iterator(cfg, source=FakeSource())
  it2.set_state(state)
  assert_batches_equal(take(it2, 4), want)


def test_state_round_trip_with_workers():
  # Grain shards the stream over workers, so the batches differ from
  # num_workers=0 (and a state only resumes with the same num_workers).
  cfg = make_cfg(cfg_dropout=0.3, num_workers=2)
  it = make_iterator(cfg, source=FakeSource())
  take(it, 2)
  state = it.get_state()
  rest = take(it, 3)
  it2 = make_iterator(cfg, source=FakeSource())
  it2.set_state(state)
  assert_batches_equal(take(it2, 3), rest)


# ------------------------------------------------------------ validate_batch


def good_batch():
  return next(make_iterator(make_cfg(), source=FakeSource()))


def test_validate_batch_errors():
  batch = good_batch()
  kw = dict(seq_len=160, patch_dim=48, batch_size=4)
  with pytest.raises(UserError, match=r"missing keys \['positions'\]"):
    validate_batch({k: v for k, v in batch.items() if k != "positions"}, **kw)
  with pytest.raises(UserError, match=r"'tokens'.*dtype int64.*astype"):
    validate_batch(dict(batch, tokens=batch["tokens"].astype(np.int64)), **kw)
  with pytest.raises(UserError, match=r"'loss_mask'.*shape \(4, 150\)"):
    validate_batch(dict(batch, loss_mask=batch["loss_mask"][:, :150]), **kw)
  with pytest.raises(UserError, match=r"'tokens'.*expected \(2, 160\)"):
    validate_batch(batch, seq_len=160, patch_dim=48, batch_size=2)
  with pytest.raises(UserError) as e:
    validate_batch(batch, seq_len=160, patch_dim=192, batch_size=4)
  msg = str(e.value)
  assert "8x8 patches x 3 channels" in msg  # what the model expects
  assert "4x4 patches x 3 channels, image_size 16" in msg  # what the data is
  assert "\n" not in msg
  with pytest.raises(UserError, match="dict of arrays"):
    validate_batch([1, 2], **kw)


# --------------------------------------------------------------- integration


def test_shapes_source_integration(tok):
  shapes = pytest.importorskip("unimm.data.shapes")
  cfg = make_cfg(image_size=32, seq_len=256, batch_size=4, cfg_dropout=0.1)
  cfg.data.tasks = {"t2i": 1.0, "caption": 1.0, "qa": 1.0, "edit": 1.0,
                    "story": 1.0}
  cfg.model.patch_size = 8
  assert hasattr(shapes, "ShapesSource")
  it = make_iterator(cfg)
  batches = take(it, 2)
  for batch in batches:
    validate_batch(batch, seq_len=256, patch_dim=192, batch_size=4)
    assert (batch["segment_ids"] > 0).mean() > 0.5
    assert (batch["loss_mask"] > 0).any()
    assert (batch["modality"] == NOISED_IMAGE).any()
  assert_batches_equal(batches, take(make_iterator(cfg), 2))
