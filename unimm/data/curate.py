"""Curates converted folders: measures every record, filters, deduplicates, scores with a
trained model, recaptions and mines new documents, and writes a new folder.

    python -m unimm.data.curate --input DIR [--input DIR ...] --output DIR [flags]
    python -m unimm.data.curate corrupt --output DIR [--n 2000] [--rate 0.3] [--seed 0]
    python -m unimm.data.curate measure --output DIR --truth DIR/faults.json
    python -m unimm.data.curate stories --output DIR [--n 300]
    python -m unimm.data.curate measure-mining --output DIR --truth T --input DIR
    python -m unimm.data.curate measure-captions --output DIR

The first streams the records of the input folders (the ArrayRecord schema of
`unimm.data.records`, in order, folder after folder), measures each document's images and
text, and drops it by the first rule it fails, in this order (a flag set to 0 turns its
rule off):

    malformed_record, <a records.Skip reason>   the record or an image cannot be read
    latent_only          an image holds a latent, no bytes (a latent cache: curate its source)
    too_small            an image side < --min-side pixels
    too_large            an image side > --max-side pixels
    bad_aspect           an image's long side / short side > --max-aspect
    flat_image           an image's pixel std (0..255) < --min-std
    low_entropy          an image's grey-level entropy (bits, 0..8) < --min-entropy
    low_jpeg_quality     a JPEG's quality estimate (from its quantisation table) < --min-jpeg-quality
    caption_too_short    the document's text (its text segments joined) has < --min-chars
                         characters or < --min-words words
    caption_too_long     > --max-chars characters or > --max-words words
    few_letters          letters / non-space characters < --min-letter-share
    caption_mismatch     with --judge DIR: the caption's mean log-likelihood per token given
                         the image (`unimm.data.judge`) < --min-caption-score (-0.2 for the
                         demo checkpoint; default off, scores are still written)
    unscored             with --judge and --unscored drop: a document the judge cannot score
                         (not one image and a caption); --unscored keep (default) keeps and
                         counts them ("unscored" in the summary)
    exact_duplicate      the same decoded pixels (sha256) as an earlier kept document
    near_duplicate       perceptual hash (`phash`) within --phash-distance bits (of 3072) of an earlier kept document

Duplicates are looked for across all input folders and the first one is kept. Kept
documents go to DIR/docs-NNNNN.array_record (one shard per chunk of --chunk input records)
with DIR/info.json (written last, as by convert), so DIR is a data source for
`data.mixture`; --recaption adds the judge's caption to each kept pair's meta, --mine
writes mined documents instead (`Models`; the candidates and their scores in
DIR/mined.parquet). DIR/curation.parquet holds one row per input record: source folder,
record id, every measured property and score, decision ("keep" / "drop"), reason and, for
a duplicate, the record it repeats. A run stopped part-way and started again with the same
arguments resumes after the last finished chunk (DIR/curate_state.json) and writes each
record once. The last stdout line is one JSON object

    {"read": N, "kept": N, "dropped": {reason: n, ...}, ["unscored": n, "mined": n, ...]
     "written": N}

`corrupt` writes a Shapes text-to-image folder with planted faults at known positions and
`measure` scores a curation against them; `stories` writes an MMC4 shard of Shapes stories
and `measure-mining` scores the edit pairs mined from it; `measure-captions` scores a
recaptioned Shapes folder with ShapesEval's caption parser.
"""

import argparse
import dataclasses
import hashlib
import json
import os
import sys

import numpy as np
from PIL import Image

from unimm.data import records
from unimm.errors import UserError, cli, read_json

STATE_FILE = "curate_state.json"
TABLE_FILE = "curation.parquet"
PARTS_DIR = "curation-parts"
MINED_FILE = "mined.parquet"
MINED_PARTS_DIR = "mined-parts"
FAULTS_FILE = "faults.json"
HASH_INPUT = 32    # phash: each colour channel of the image resized to 32x32, vs mid-grey
HASH_BITS = 3 * HASH_INPUT * HASH_INPUT
# Planted fault kinds (corrupt) -> the curation reason that should find each one.
FAULT_KINDS = ("wrong_caption", "near_duplicate", "exact_duplicate", "flat_image")
FINDS = {"near_duplicate": "near_duplicate", "exact_duplicate": "exact_duplicate",
         "flat_image": "flat_image", "wrong_caption": "caption_mismatch"}


@dataclasses.dataclass
class Filters:
  """The thresholds of curation; 0 turns a rule off (phash_distance -1 turns near-dedup off)."""
  min_side: int = 16
  max_side: int = 0
  max_aspect: float = 4.0
  min_std: float = 2.0
  min_entropy: float = 0.0
  min_jpeg_quality: int = 0
  min_chars: int = 1
  max_chars: int = 0
  min_words: int = 1
  max_words: int = 0
  min_letter_share: float = 0.5
  exact_dedup: bool = True
  phash_distance: int = 8
  min_caption_score: float = float("-inf")  # needs --judge; -0.2 for the demo checkpoint


# ------------------------------------------------------------------ measuring


def phash(pixels) -> np.ndarray:
  """uint8 RGB [H, W, 3] -> bool [3072]: the perceptual hash of near-deduplication. The image
  is box-resized to 32x32 and each colour channel's pixels are compared with mid-grey (128): a
  per-channel average hash at 32x32 with a fixed threshold. Not a DCT pHash: at 32 px the 8x8
  lowest DCT frequencies cannot tell a Shapes circle from a square in the same cell, and a
  median threshold flips bits at random in a channel with no content (ties at 0)."""
  img = Image.fromarray(np.asarray(pixels, np.uint8))
  if img.size != (HASH_INPUT, HASH_INPUT):
    img = img.resize((HASH_INPUT, HASH_INPUT), Image.Resampling.BOX)
  return (np.asarray(img) >= 128).transpose(2, 0, 1).reshape(-1)


def jpeg_quality(img):
  """A JPEG's quality (1..100) estimated from its luminance quantisation table against the
  IJG standard table, as libjpeg scales it; None for other formats. Reads the header only."""
  tables = getattr(img, "quantization", None)
  if img.format != "JPEG" or not tables or 0 not in tables:
    return None
  scale = 100.0 * float(np.sum(tables[0])) / float(np.sum(_IJG_LUMA))
  quality = (200.0 - scale) / 2.0 if scale <= 100.0 else 5000.0 / scale
  return int(round(min(100.0, max(1.0, quality))))


_IJG_LUMA = np.array([
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99])


def measure_image(data) -> dict:
  """Encoded image bytes -> its measured properties (width, height, aspect, std, entropy,
  jpeg_quality, sha256 of the decoded pixels, phash). Raises records.Skip for bad bytes."""
  pixels = records.decode_image(data)
  h, w = pixels.shape[:2]
  small = pixels
  if max(h, w) > 256:  # std and entropy of a thumbnail: the same to a few percent, far cheaper
    img = Image.fromarray(pixels)
    img.thumbnail((256, 256), Image.Resampling.BOX)
    small = np.asarray(img)
  grey = np.asarray(Image.fromarray(small).convert("L"))
  p = np.bincount(grey.reshape(-1), minlength=256) / grey.size
  p = p[p > 0]
  digest = hashlib.sha256(np.array([h, w], np.int64).tobytes() + pixels.tobytes()).hexdigest()
  return {"width": int(w), "height": int(h), "aspect": max(w, h) / min(w, h),
          "std": float(small.reshape(-1, small.shape[-1]).std(axis=0).max()), "entropy": float(-(p * np.log2(p)).sum()),
          "jpeg_quality": jpeg_quality(records._open(bytes(data), records.MAX_PIXELS)),  # pylint: disable=protected-access
          "sha256": digest, "phash": phash(pixels)}


def caption_of(doc) -> str:
  """A document's text: its text segments joined by spaces."""
  return " ".join(s["text"].strip() for s in doc["segments"] if s["kind"] == "text").strip()


def measure_text(text) -> dict:
  chars = [c for c in text if not c.isspace()]
  letters = sum(c.isalpha() for c in chars)
  return {"chars": len(text), "words": len(text.split()),
          "letter_share": letters / len(chars) if chars else 0.0}


def _image_rule(m, f: Filters):
  if f.min_side and min(m["width"], m["height"]) < f.min_side:
    return "too_small"
  if f.max_side and max(m["width"], m["height"]) > f.max_side:
    return "too_large"
  if f.max_aspect and m["aspect"] > f.max_aspect:
    return "bad_aspect"
  if f.min_std and m["std"] < f.min_std:
    return "flat_image"
  if f.min_entropy and m["entropy"] < f.min_entropy:
    return "low_entropy"
  if f.min_jpeg_quality and m["jpeg_quality"] is not None \
      and m["jpeg_quality"] < f.min_jpeg_quality:
    return "low_jpeg_quality"
  return None


def _text_rule(t, f: Filters):
  if t["chars"] < f.min_chars or t["words"] < f.min_words:
    return "caption_too_short"
  if f.max_chars and t["chars"] > f.max_chars or f.max_words and t["words"] > f.max_words:
    return "caption_too_long"
  if f.min_letter_share and t["letter_share"] < f.min_letter_share:
    return "few_letters"
  return None


_POPCOUNT = np.array([bin(i).count("1") for i in range(256)], np.uint8)


class Deduper:
  """Exact (sha256 of every image's pixels) and near (every image's hash within `distance`
  bits) duplicates of the documents added so far. Near matches are a vectorised scan of the
  packed hashes of the documents with as many images (XOR and popcount): about 1 ms per
  record for 10k kept documents; an index (bands, LSH) is what millions will need."""

  def __init__(self, distance: int, exact: bool = True):
    self.distance = int(distance)
    self.exact = {} if exact else None
    self.packed = {}   # images per document -> (uint8 [capacity, images, bytes], count)
    self.names = {}

  def find(self, sha, hashes):
    """(reason, name of the earlier document, Hamming distance) or None."""
    if self.exact is not None and sha in self.exact:
      return "exact_duplicate", self.exact[sha], 0
    k = len(hashes)
    if self.distance < 0 or not k or k not in self.packed:
      return None
    table, n = self.packed[k]
    d = _POPCOUNT[table[:n] ^ np.packbits(hashes, axis=-1)].sum(-1, dtype=np.int64).max(-1)
    i = int(np.argmin(d))
    return ("near_duplicate", self.names[k][i], int(d[i])) if d[i] <= self.distance else None

  def add(self, sha, hashes, name):
    if self.exact is not None:
      self.exact.setdefault(sha, name)
    k = len(hashes)
    if self.distance < 0 or not k:
      return
    packed = np.packbits(hashes, axis=-1)
    table, n = self.packed.get(k, (np.zeros((64,) + packed.shape, np.uint8), 0))
    if n == len(table):
      table = np.concatenate([table, np.zeros_like(table)])
    table[n] = packed
    self.packed[k] = (table, n + 1)
    self.names.setdefault(k, []).append(name)


def measure_record(record, f: Filters):
  """One packed record -> (document or None, row of measurements, drop reason or None), the
  dedup keys in row["sha256"] / row["phash"] (hex, ";" between images). Never raises."""
  row = {"task": None, "images": 0, "width": None, "height": None, "aspect": None,
         "std": None, "entropy": None, "jpeg_quality": None, "chars": None, "words": None,
         "letter_share": None, "sha256": None, "phash": None}
  try:
    doc = records.unpack(record)
  except records.Skip as e:
    return None, row, e.reason
  row["task"] = str(doc.get("task"))
  images = [s for s in doc["segments"] if s["kind"] == "image"]
  row["images"] = len(images)
  measured, reason = [], None
  for seg in images:
    if not isinstance(seg.get("bytes"), bytes):
      return doc, row, "latent_only"
    try:
      measured.append(measure_image(seg["bytes"]))
    except records.Skip as e:
      return doc, row, e.reason
  if measured:  # the worst image speaks for the document
    row.update(width=min(m["width"] for m in measured), height=min(m["height"] for m in measured),
               aspect=max(m["aspect"] for m in measured), std=min(m["std"] for m in measured),
               entropy=min(m["entropy"] for m in measured))
    qualities = [m["jpeg_quality"] for m in measured if m["jpeg_quality"] is not None]
    row["jpeg_quality"] = min(qualities) if qualities else None
    row["sha256"] = hashlib.sha256("".join(m["sha256"] for m in measured).encode()).hexdigest() \
        if len(measured) > 1 else measured[0]["sha256"]
    row["phash"] = ";".join(np.packbits(m["phash"]).tobytes().hex() for m in measured)
    for m in measured:
      reason = reason or _image_rule(m, f)
  row.update(measure_text(caption_of(doc)))
  reason = reason or _text_rule(row, f)
  return doc, row, reason


def _hashes(row):
  if not row["phash"]:
    return np.zeros((0, HASH_BITS), bool)
  return np.stack([np.unpackbits(np.frombuffer(bytes.fromhex(h), np.uint8)).astype(bool)
                   for h in row["phash"].split(";")])


# ------------------------------------------------------------------- curating


def _inputs(folders):
  """[(folder, [(shard path, records)], total)] of the input folders; UserErrors for bad ones."""
  out = []
  for folder in folders:
    shards = []
    for path in records.shard_paths(folder):
      reader = records.open_shard(path)
      shards.append((path, int(reader.num_records())))
      reader.close()
    out.append((folder, shards))
  return out


def _stream(inputs, start):
  """(source folder, record id, packed record) from global position `start` on."""
  position = 0
  for folder, shards in inputs:
    rid = 0
    for path, n in shards:
      if position + n <= start:
        position, rid = position + n, rid + n
        continue
      reader = records.open_shard(path)
      try:
        first = max(0, start - position)
        for i in range(first, n, 256):
          for j, rec in enumerate(reader.read(i, min(n, i + 256))):
            yield folder, rid + i + j, rec
      finally:
        reader.close()
      position, rid = position + n, rid + n


def _write_json(path, value):
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=1)
  os.replace(tmp, path)


def _write_chunk(output, chunk, docs, rows, mined_rows=None):
  """A chunk's shard (if it wrote any document) and table parts, each written whole then
  renamed."""
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  name = None
  if docs:
    name = f"docs-{chunk:05d}.array_record"
    tmp = os.path.join(output, name + ".tmp")
    writer = ArrayRecordWriter(tmp, "group_size:1")
    for rec in docs:
      writer.write(rec)
    writer.close()
    os.replace(tmp, os.path.join(output, name))
  tables = [(PARTS_DIR, rows, TABLE_SCHEMA)]
  if mined_rows is not None:
    tables.append((MINED_PARTS_DIR, mined_rows, MINED_SCHEMA))
  for folder, part_rows, schema in tables:
    parts = os.path.join(output, folder)
    os.makedirs(parts, exist_ok=True)
    path = os.path.join(parts, f"part-{chunk:05d}.parquet")
    pq.write_table(pa.Table.from_pylist(part_rows, schema=schema), path + ".tmp")
    os.replace(path + ".tmp", path)
  return name


def _table_schema():
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  f64, i64, s = pa.float64(), pa.int64(), pa.string()
  return pa.schema([("source", s), ("record", i64), ("task", s), ("images", i64),
                    ("width", i64), ("height", i64), ("aspect", f64), ("std", f64),
                    ("entropy", f64), ("jpeg_quality", i64), ("chars", i64), ("words", i64),
                    ("letter_share", f64), ("sha256", s), ("phash", s), ("caption_score", f64),
                    ("recaption", s), ("mined", i64), ("decision", s), ("reason", s),
                    ("duplicate_of", s), ("hamming", i64)])


TABLE_SCHEMA = MINED_SCHEMA = None  # set on first use (pyarrow is imported lazily)


@dataclasses.dataclass
class Models:
  """What curation asks a judge (`unimm.data.judge`, a local model directory) for.

  unscored: "keep" or "drop" the documents a judge cannot score (not one image and a
  caption: edits, interleaved documents, text only), counted either way. recaption: write
  the judge's caption of each kept pair into meta["recaption"] (the original caption stays
  in the text and in meta["original_caption"]; data.recaption_prob picks between them).
  mine: "" (keep the documents), "edits" (edit pairs from interleaved documents: two
  successive images, the text between them as the instruction, kept when the judge's
  `explained` score (`unimm.data.judge`: how much the source and the text explain the
  target) is in [min_explained, max_explained] and the two images are not near-duplicates
  (phash within --phash-distance: no edit happened)),
  "groups" (every such image-text-image group, BAGEL-style, no band) or "reasoning"
  (captioned pairs -> prompt, the judge's description of the image as a text with loss,
  then the image). Mined documents replace their sources in the output unless keep_sources.
  """
  judge: str = ""
  unscored: str = "keep"
  recaption: bool = False
  mine: str = ""
  min_explained: float = 0.2  # measured on the demo checkpoint (README, "Curating data")
  max_explained: float = 1.0
  keep_sources: bool = False
  batch_size: int = 0


MINE_KINDS = ("", "edits", "groups", "reasoning")


def _check_models(m: Models, f: Filters):
  if m.unscored not in ("keep", "drop"):
    raise UserError(f"--unscored {m.unscored}: use keep or drop")
  if m.mine not in MINE_KINDS:
    raise UserError(f"--mine {m.mine}: use one of {', '.join(k for k in MINE_KINDS if k)}")
  needs = [what for what, on in (("--min-caption-score", f.min_caption_score > float("-inf")),
                                 ("--recaption", m.recaption),
                                 (f"--mine {m.mine}", m.mine in ("edits", "reasoning")))
           if on]
  if needs and not m.judge:
    raise UserError(f"{needs[0]} needs --judge DIR (a training workdir, e.g. runs/demo, or a "
                    "local Hugging Face vision-language checkpoint)")


def _pair(doc):
  """(image bytes, caption) of a document with exactly one image and some text, else None."""
  images = [g.get("bytes") for g in doc["segments"] if g["kind"] == "image"]
  text = caption_of(doc)
  return (images[0], text) if len(images) == 1 and isinstance(images[0], bytes) and text else None


def _decode(data, judge):
  size = getattr(judge, "image_size", None)
  return records.decode_image(data, size=(size, size) if size else None)


def _score(items, judge, filters: Filters, models: Models, counts):
  """Caption scores of the scorable items still kept; drops by caption_mismatch / unscored."""
  todo, images, captions = [], [], []
  for it in items:
    if it["reason"] is not None:
      continue
    pair = _pair(it["doc"])
    if pair is None:
      if models.unscored == "drop":
        it["reason"] = "unscored"
      else:
        counts["unscored"] = counts.get("unscored", 0) + 1
      continue
    todo.append(it)
    images.append(_decode(pair[0], judge))
    captions.append(pair[1])
  if todo:
    for it, score in zip(todo, judge.caption_scores(images, captions)):
      it["row"]["caption_score"] = float(score)
      if score < filters.min_caption_score:
        it["reason"] = "caption_mismatch"


def _recaption(kept, judge):
  """meta["recaption"] (the judge's caption) and meta["original_caption"] of the kept pairs."""
  todo = [it for it in kept if _pair(it["doc"]) is not None]
  if not todo:
    return
  texts = judge.captions([_decode(_pair(it["doc"])[0], judge) for it in todo])
  for it, text in zip(todo, texts):
    doc = it["doc"]
    doc["meta"] = dict(doc.get("meta") or {}, recaption=text, original_caption=caption_of(doc))
    it["row"]["recaption"] = text
    it["rec"] = records.pack(doc)


def _groups(doc):
  """(first image index, second, text between, first segment, second segment) of each two
  successive images of a document with non-empty text between them."""
  out, last, texts, k = [], None, [], -1
  for seg in doc["segments"]:
    if seg["kind"] == "text":
      texts.append(seg["text"].strip())
      continue
    k += 1
    text = " ".join(t for t in texts if t)
    if last is not None and text and isinstance(seg.get("bytes"), bytes) \
        and isinstance(last[1].get("bytes"), bytes):
      out.append((last[0], k, text, last[1], seg))
    last, texts = (k, seg), []
  return out


def _mine(kept, judge, models: Models, where, phash_distance):
  """Mined documents (packed) and table rows of the kept items; sets each row's "mined"."""
  docs, rows = [], []
  if models.mine == "reasoning":
    todo = [it for it in kept if _pair(it["doc"]) is not None]
    new = [it for it in todo if it["row"]["recaption"] is None]  # --recaption wrote the rest
    written = judge.captions([_decode(_pair(it["doc"])[0], judge) for it in new]) if new else []
    thoughts = {id(it): text for it, text in zip(new, written)}
    for it in todo:
      thought = thoughts.get(id(it), it["row"]["recaption"])
      data, prompt = _pair(it["doc"])
      docs.append(records.pack({"task": "reasoning", "segments": [
          {"kind": "text", "text": prompt, "loss": False},
          {"kind": "text", "text": f" Thinking: {thought}. Image:", "loss": True},
          {"kind": "image", "bytes": data, "role": "target"}],
          "meta": {"mined_from": [it["folder"], it["rid"]], "prompt": prompt,
                   "thinking": thought}}))
      it["row"]["mined"] = 1
      rows.append(dict(where(it), first=0, second=0, text=thought, hamming=None,
                       source_gain=None, explained=None, decision="keep"))
    return docs, rows
  cands = [(it, g) for it in kept for g in _groups(it["doc"])]
  gains = explained = [None] * len(cands)
  hamming = [None] * len(cands)
  if cands and models.mine == "edits":
    gains, explained = judge.pair_scores([_decode(g[3]["bytes"], judge) for _, g in cands],
                                         [g[2] for _, g in cands],
                                         [_decode(g[4]["bytes"], judge) for _, g in cands])
    hashes = {id(it): _hashes(it["row"]) for it in kept}  # measure_record's, image by image
    hamming = [int((hashes[id(it)][g[0]] != hashes[id(it)][g[1]]).sum()) for it, g in cands]
  for (it, (i, j, text, first, second)), gain, score, dist in zip(cands, gains, explained,
                                                                  hamming):
    ok = models.mine == "groups" or (models.min_explained <= score <= models.max_explained
                                     and dist > max(phash_distance, 0))
    rows.append(dict(where(it), first=i, second=j, text=text, hamming=dist,
                     source_gain=None if gain is None else float(gain),
                     explained=None if score is None else float(score),
                     decision="keep" if ok else "drop"))
    if not ok:
      continue
    it["row"]["mined"] = (it["row"]["mined"] or 0) + 1
    task = "edit" if models.mine == "edits" else "interleaved"
    docs.append(records.pack({"task": task, "segments": [
        {"kind": "image", "bytes": first["bytes"], "role": "condition"},
        {"kind": "text", "text": text, "loss": models.mine == "groups"},
        {"kind": "image", "bytes": second["bytes"], "role": "target"}],
        "meta": {"mined_from": [it["folder"], it["rid"]], "images": [i, j],
                 "instruction": text}}))
  return docs, rows


def _mined_schema():
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  f64, i64, s = pa.float64(), pa.int64(), pa.string()
  return pa.schema([("source", s), ("record", i64), ("first", i64), ("second", i64),
                    ("text", s), ("hamming", i64), ("source_gain", f64), ("explained", f64),
                    ("decision", s)])


def curate(inputs, output, filters: Filters | None = None, chunk: int = 10_000,
           stop_after: int | None = None, progress: bool = True, models: Models | None = None,
           judge=None) -> dict:
  """Curates the converted folders `inputs` into `output`; returns the summary (see the module
  docstring). stop_after=k stops after k chunks of this call, as an interruption would (for
  tests); a later call with the same arguments resumes. `judge`: an already loaded judge for
  models.judge (tests), else it is loaded from that directory when needed."""
  global TABLE_SCHEMA, MINED_SCHEMA  # pylint: disable=global-statement
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  TABLE_SCHEMA = TABLE_SCHEMA or _table_schema()
  MINED_SCHEMA = MINED_SCHEMA or _mined_schema()
  filters, models = filters or Filters(), models or Models()
  if chunk < 1:
    raise UserError(f"--chunk must be >= 1, got {chunk}")
  if not inputs:
    raise UserError("give at least one --input folder (written by python -m unimm.data.convert)")
  _check_models(models, filters)
  folders = [os.path.abspath(str(d)) for d in inputs]
  output = os.path.abspath(str(output))
  if output in folders:
    raise UserError(f"--output {output} is also an --input: choose a new folder")
  plan = _inputs(folders)
  total = sum(n for _, shards in plan for _, n in shards)
  settings = {"inputs": folders, "records": total, "chunk": int(chunk),
              "filters": dataclasses.asdict(filters),
              "models": dict(dataclasses.asdict(models), judge=models.judge and
                             os.path.abspath(models.judge), batch_size=None)}
  state_path = os.path.join(output, STATE_FILE)
  state = {"done": 0, "read": 0, "kept": 0, "written": 0, "images": 0, "dropped": {},
           "counts": {}, "shards": []}
  if os.path.exists(state_path):
    old = read_json(state_path, "remove the output folder and curate again",
                    f"the {STATE_FILE} `python -m unimm.data.curate` writes")
    if old.get("settings") != settings:
      raise UserError(f"--output {output} holds a curation with other inputs or settings "
                      f"({STATE_FILE}): give the same arguments to resume, or a new folder")
    state = old["state"]
  elif os.path.isdir(output) and os.listdir(output):
    raise UserError(f"output folder {output} is not empty and holds no {STATE_FILE}: choose an "
                    "empty or new --output folder")
  os.makedirs(output, exist_ok=True)
  _write_json(state_path, {"settings": settings, "state": state})

  dedup = Deduper(filters.phash_distance, filters.exact_dedup)
  for c in range(state["done"]):  # the dedup index of the finished chunks
    part = os.path.join(output, PARTS_DIR, f"part-{c:05d}.parquet")
    for row in pq.read_table(part).to_pylist():
      if row["decision"] == "keep" and row["sha256"]:
        dedup.add(row["sha256"], _hashes(row), f"{row['source']}:{row['record']}")

  chunks = (total + chunk - 1) // chunk
  if judge is None and models.judge and state["done"] < chunks:
    from unimm.data.judge import load_judge  # pylint: disable=import-outside-toplevel
    judge = load_judge(models.judge, models.batch_size or None)
  start = state["done"] * chunk
  bar = tqdm(total=total, initial=start, desc="curate", unit=" docs", file=sys.stderr,
             dynamic_ncols=True, disable=not progress)
  stream = _stream(plan, start)
  where = lambda it: {"source": it["folder"], "record": it["rid"]}
  ran = 0
  for c in range(state["done"], chunks):
    if stop_after is not None and ran >= stop_after:
      break
    dropped, counts = dict(state["dropped"]), dict(state["counts"])
    items = []
    for _ in range(min(chunk, total - c * chunk)):
      folder, rid, rec = next(stream)
      doc, row, reason = measure_record(rec, filters)
      row = dict(row, source=folder, record=rid, duplicate_of=None, hamming=None,
                 caption_score=None, recaption=None, mined=None)
      items.append({"folder": folder, "rid": rid, "rec": bytes(rec), "doc": doc, "row": row,
                    "reason": reason})
    if judge is not None:
      _score(items, judge, filters, models, counts)
    kept = []
    for it in items:
      row = it["row"]
      if it["reason"] is None and row["sha256"]:
        found = dedup.find(row["sha256"], _hashes(row))
        if found:
          it["reason"], row["duplicate_of"], row["hamming"] = found
      if it["reason"] is None:
        kept.append(it)
        if row["sha256"]:
          dedup.add(row["sha256"], _hashes(row), f"{it['folder']}:{it['rid']}")
      else:
        dropped[it["reason"]] = dropped.get(it["reason"], 0) + 1
      bar.update(1)
    if models.recaption:
      _recaption(kept, judge)
    mined_docs, mined_rows = _mine(kept, judge, models, where, filters.phash_distance) \
        if models.mine else ([], [])
    docs = ([it["rec"] for it in kept] if not models.mine or models.keep_sources else []) + mined_docs
    images = sum(it["row"]["images"] for it in kept)
    if models.mine:
      counts["mined"] = counts.get("mined", 0) + len(mined_docs)
      counts["mining_candidates"] = counts.get("mining_candidates", 0) + len(mined_rows)
    rows = [dict(it["row"], decision="keep" if it["reason"] is None else "drop",
                 reason=it["reason"]) for it in items]
    name = _write_chunk(output, c, docs, rows, mined_rows if models.mine else None)
    state = {"done": c + 1, "read": state["read"] + len(rows), "kept": state["kept"] + len(kept),
             "written": state["written"] + len(docs), "images": state["images"] + images,
             "dropped": dict(sorted(dropped.items())), "counts": dict(sorted(counts.items())),
             "shards": state["shards"] + ([name] if name else [])}
    _write_json(state_path, {"settings": settings, "state": state})
    ran += 1
  bar.close()
  summary = {"read": state["read"], "kept": state["kept"], "dropped": state["dropped"],
             **state["counts"], "written": state["written"]}
  if state["done"] < chunks:
    return dict(summary, finished=False)
  info_path = os.path.join(output, records.INFO_FILE)
  if not os.path.exists(info_path):
    for folder, table_file, schema in ((PARTS_DIR, TABLE_FILE, TABLE_SCHEMA),
                                       (MINED_PARTS_DIR, MINED_FILE, MINED_SCHEMA)):
      if folder == MINED_PARTS_DIR and not models.mine:
        continue
      parts = [os.path.join(output, folder, f"part-{c:05d}.parquet") for c in range(chunks)]
      table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts \
          else schema.empty_table()
      pq.write_table(table, os.path.join(output, table_file))
    if not state["written"]:
      print(f"warning: curation wrote no document of {total} (dropped: {state['dropped']})",
            file=sys.stderr)
    with open(info_path + ".tmp", "w") as fp:  # last: the folder is complete
      json.dump({"format": "curated", "input": folders, "documents": state["written"],
                 "images": state["images"], "skipped": {}, "repaired": {},
                 "curation": summary, "filters": dataclasses.asdict(filters),
                 "models": settings["models"], "shards": state["shards"]}, fp, indent=1)
    os.replace(info_path + ".tmp", info_path)
  return summary


# ------------------------------------------------------------ Shapes with faults


def corrupt(output, n: int = 2000, rate: float = 0.3, seed: int = 0, image_size: int = 32,
            kinds=FAULT_KINDS, two_object_prob: float = 0.3) -> dict:
  """Writes a converted folder of n Shapes text-to-image documents, round(rate * n) of them
  faulty (the kinds in equal shares, at random positions after the first record):

    wrong_caption     a new scene's image with the caption of another scene
    near_duplicate    an earlier clean record's scene with a tiny change: a JPEG re-encode
                      (quality 90), one pixel inverted, or +-2 noise (not a whole-image shift:
                      moving a 32-px Shapes scene by 1 px changes as many pixels as turning a
                      circle into a square, a different scene)
    exact_duplicate   an earlier clean record again, byte for byte
    flat_image        one flat colour (a palette colour, black or grey) with a scene's caption

  Clean scenes are all different images. The ground truth, {"faults": {record id: {"kind",
  "of": the earlier record or null, "variant"}}, ...}, goes to output/faults.json; returns it."""
  from unimm.data import fixtures, shapes  # pylint: disable=import-outside-toplevel
  if n < 2:
    raise UserError(f"--n must be >= 2, got {n}")
  if not 0 <= rate < 1:
    raise UserError(f"--rate must be in [0, 1), got {rate}")
  unknown = sorted(set(kinds) - set(FAULT_KINDS))
  if unknown or not kinds:
    raise UserError(f"unknown fault kind(s) {unknown or kinds}: choose from {list(FAULT_KINDS)}")
  image_size = shapes.check_image_size(image_size)
  rng = np.random.default_rng(seed)
  k = int(round(rate * n))
  positions = rng.choice(np.arange(1, n), size=k, replace=False)
  plan = {int(p): kinds[i % len(kinds)] for i, p in enumerate(rng.permutation(positions))}
  seen, clean, faults = set(), [], {}
  scenes, encoded = {}, {}

  def new_scene():
    for _ in range(10_000):
      scene = shapes.random_scene(rng, 2 if rng.random() < two_object_prob else 1)
      key = shapes.render(scene, image_size).tobytes()
      if key not in seen:
        seen.add(key)
        return scene
    raise UserError(f"--n {n} is more distinct Shapes scenes than image_size {image_size} allows")

  writer = records.ShardWriter(output, docs_per_shard=max(1, n))
  for i in range(n):
    kind = plan.get(i)
    variant, of = None, None
    if kind in ("near_duplicate", "exact_duplicate"):
      of = int(clean[rng.integers(len(clean))])
      scene = scenes[of]
    else:
      scene = new_scene()
    cap = shapes.caption(scene)
    pixels = shapes.render(scene, image_size)
    data = fixtures.encode_png(pixels)
    if kind == "exact_duplicate":
      data = encoded[of]
    elif kind == "near_duplicate":
      variant = ("jpeg", "pixel", "noise")[int(rng.integers(3))]
      data = _nudge(pixels, variant, rng)
    elif kind == "wrong_caption":
      other = new_scene()  # a different scene's caption
      seen.discard(shapes.render(other, image_size).tobytes())
      cap = shapes.caption(other)
    elif kind == "flat_image":
      colors = list(shapes.COLORS.values()) + [(0, 0, 0), (128, 128, 128)]
      flat = np.zeros_like(pixels) + np.array(colors[rng.integers(len(colors))], np.uint8)
      data = fixtures.encode_png(flat)
    if kind is None:
      clean.append(i)
    else:
      faults[str(i)] = {"kind": kind, "of": of, "variant": variant}
    scenes[i] = scene
    encoded[i] = data
    writer.write({"task": "t2i", "segments": [{"kind": "text", "text": cap, "loss": True},
                                              {"kind": "image", "bytes": data, "role": "target"}],
                  "meta": {"scene": scene, "caption": cap}})
  counts = {kind: sum(f["kind"] == kind for f in faults.values()) for kind in kinds}
  writer.close({"format": "shapes_corrupt", "documents": n, "images": n, "skipped": {},
                "repaired": {}, "faults": counts, "seed": seed})
  truth = {"n": n, "rate": rate, "seed": seed, "counts": counts, "faults": faults}
  _write_json(os.path.join(output, FAULTS_FILE), truth)
  return truth


def _nudge(pixels, variant, rng):
  """Encoded bytes of `pixels` changed a little (a near duplicate)."""
  from unimm.data import fixtures  # pylint: disable=import-outside-toplevel
  a = pixels.copy()
  if variant == "jpeg":
    return fixtures.encode_jpeg(a, quality=90)
  if variant == "pixel":
    y, x = rng.integers(a.shape[0]), rng.integers(a.shape[1])
    a[y, x] = 255 - a[y, x]
  else:
    a = np.clip(a.astype(np.int16) + rng.integers(-2, 3, a.shape), 0, 255).astype(np.uint8)
  return fixtures.encode_png(a)


STORIES_TRUTH = "stories_truth.json"


def stories(output, n: int = 300, distractor_rate: float = 0.3, repeat_rate: float = 0.1,
            seed: int = 0, image_size: int = 32) -> dict:
  """Writes an MMC4 shard of n Shapes stories (output/stories.jsonl, images in output/images)
  to mine edit pairs from, and the truth (output/stories_truth.json). A story is a caption,
  its scene's image, then 1-3 successive edits, each an instruction followed by the image
  after it, as a web page of step-by-step pictures would be. Between two steps, with
  probability distractor_rate, an unrelated picture with its own sentence ("Also on this
  page: <caption>.") and, with probability repeat_rate, the same picture again ("The same
  picture once more."): pairs mining must reject (the repeat and the next step's picture are
  an edit again). The truth, per document (its url), holds
  for each two successive images the true instruction, or null where they are not an edit.
  Convert with `python -m unimm.data.convert --format mmc4`."""
  from unimm.data import fixtures, shapes  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  image_size = shapes.check_image_size(image_size)
  png = lambda scene: fixtures.encode_png(shapes.render(scene, image_size))
  docs, truth = [], {}
  for d in range(n):
    scenes, instructions = shapes.random_story(rng, 1 + int(rng.integers(2)),
                                               1 + int(rng.integers(shapes.MAX_EDITS)))
    reading = [("text", shapes.caption(scenes[0]) + "."), ("image", png(scenes[0]), "story")]
    for instruction, scene in zip(instructions, scenes[1:]):
      if rng.random() < distractor_rate:
        other = shapes.random_scene(rng, 1 + int(rng.integers(2)))
        reading += [("text", f"Also on this page: {shapes.caption(other)}."),
                    ("image", png(other), "other")]
      elif rng.random() < repeat_rate:
        reading += [("text", "The same picture once more."), ("image", reading[-1][1], "repeat")]
      reading += [("text", instruction + "."), ("image", png(scene), "story")]
    reading.append(("text", "The end."))
    texts, images, pairs, last = [], [], [], None
    for k, item in enumerate(reading):
      if item[0] == "text":
        texts.append(item[1])
        continue
      images.append({"bytes": item[1], "matched_text_index": len(texts)})  # before the next text
      if last is not None:
        between = reading[k - 1][1].rstrip(".")
        pairs.append(between if last in ("story", "repeat") and item[2] == "story" else None)
      last = item[2]
    url = f"https://example.com/shapes-story-{seed}-{d}"
    docs.append({"text_list": texts, "images": images, "url": url})
    truth[url] = pairs
  os.makedirs(output, exist_ok=True)
  fixtures.write_mmc4(os.path.join(output, "stories.jsonl"), os.path.join(output, "images"), docs)
  out = {"n": n, "seed": seed, "pairs": truth,
         "edits": sum(p is not None for v in truth.values() for p in v),
         "not_edits": sum(p is None for v in truth.values() for p in v)}
  _write_json(os.path.join(output, STORIES_TRUTH), out)
  return out


def measure_mining(curated, truth, converted) -> dict:
  """Mined edit pairs (curated/mined.parquet) against `stories`' truth, the documents found
  by their url in the converted folder: {"candidates", "true_edits", "kept", "correct",
  "precision" (kept pairs whose text is the true instruction), "recall"}."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  if os.path.isdir(truth):
    truth = os.path.join(truth, STORIES_TRUTH)
  truth = read_json(truth, "give the stories_truth.json `curate stories` wrote",
                    "the stories truth file")
  path = os.path.join(str(curated), MINED_FILE)
  if not os.path.isfile(path):
    raise UserError(f"{path} does not exist: curate with --mine edits first")
  urls = {}
  for folder, rid, rec in _stream(_inputs([os.path.abspath(str(converted))]), 0):
    urls[rid] = (records.unpack(rec).get("meta") or {}).get("url")
  rows = [r for r in pq.read_table(path).to_pylist()
          if r["source"] == os.path.abspath(str(converted))]
  norm = lambda t: " ".join(str(t).lower().strip(" .").split())
  kept = [r for r in rows if r["decision"] == "keep"]

  def true(r):
    pairs = truth["pairs"].get(urls.get(r["record"]), [])
    i = r["first"]
    return pairs[i] if r["second"] == i + 1 and i < len(pairs) else None
  correct = sum(true(r) is not None and norm(true(r)) == norm(r["text"]) for r in kept)
  return {"candidates": len(rows), "true_edits": truth["edits"], "kept": len(kept),
          "correct": correct, "precision": correct / len(kept) if kept else None,
          "recall": correct / truth["edits"] if truth["edits"] else None}


# ------------------------------------------------------------------ measuring


def measure(table, truth, source=None) -> dict:
  """A curation's decisions (its curation.parquet, or the folder holding it) against a
  ground truth (`corrupt`'s faults.json, or its dict) -> {fault kind: {"reason", "planted",
  "flagged", "found", "precision", "recall"}} plus "any_fault" (any drop vs any fault).
  Only the rows of `source` count (default: the folder of the faults file, else all rows)."""
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  if isinstance(truth, (str, os.PathLike)):
    if os.path.isdir(truth):
      truth = os.path.join(truth, FAULTS_FILE)
    if not os.path.isfile(truth):
      raise UserError(f"--truth {truth} does not exist: give the faults.json that "
                      "`python -m unimm.data.curate corrupt` wrote")
    source = source or os.path.dirname(os.path.abspath(truth))
    with open(truth) as f:
      truth = json.load(f)
  table = str(table)
  if os.path.isdir(table):
    table = os.path.join(table, TABLE_FILE)
  if not os.path.isfile(table):
    raise UserError(f"{table} does not exist: give a folder `python -m unimm.data.curate` "
                    "finished")
  rows = pq.read_table(table).to_pylist()
  if source:
    rows = [r for r in rows if r["source"] == os.path.abspath(source)]
  if not rows:
    raise UserError(f"{table} has no rows of {source}: curate that folder")
  planted = {int(k): v["kind"] for k, v in truth["faults"].items()}
  out = {}
  for kind in sorted({*planted.values()}):
    reason = FINDS.get(kind)
    truly = {r["record"] for r in rows if planted.get(r["record"]) == kind}
    flagged = {r["record"] for r in rows if reason and r["reason"] == reason}
    found = len(truly & flagged)
    out[kind] = {"reason": reason, "planted": len(truly), "flagged": len(flagged),
                 "found": found,
                 "precision": found / len(flagged) if flagged else None,
                 "recall": found / len(truly) if truly else None}
  truly = {r["record"] for r in rows if r["record"] in planted}
  flagged = {r["record"] for r in rows if r["decision"] == "drop"}
  found = len(truly & flagged)
  out["any_fault"] = {"reason": "any", "planted": len(truly), "flagged": len(flagged),
                      "found": found, "precision": found / len(flagged) if flagged else None,
                      "recall": found / len(truly) if truly else None}
  return out


def measure_captions(curated) -> dict:
  """The recaptions of a curated Shapes folder (meta["recaption"]) scored by ShapesEval's
  caption parser against each record's true scene (meta["scene"]), as the eval scores a
  model's captions: {"documents", "all", "color", "shape", "position", "attribute", "exact"},
  and the original captions' scores under "original/..." (1.0 for a clean folder)."""
  from unimm.eval.shapes_eval import score_caption  # pylint: disable=import-outside-toplevel
  scenes, new, old = [], [], []
  for _, _, rec in _stream(_inputs([os.path.abspath(str(curated))]), 0):
    meta = records.unpack(rec).get("meta") or {}
    if "recaption" in meta and "scene" in meta:
      scenes.append(meta["scene"])
      new.append(meta["recaption"])
      old.append(meta.get("original_caption", ""))
  if not scenes:
    raise UserError(f"{curated} holds no recaptioned Shapes record (meta recaption and scene): "
                    "curate a `corrupt` folder with --recaption --judge DIR")
  out = {"documents": len(scenes), **{k: float(v) for k, v in score_caption(new, scenes).items()}}
  out.update({f"original/{k}": float(v) for k, v in score_caption(old, scenes).items()})
  return out


def format_table(result) -> str:
  """The measure() result as a Markdown table."""
  def num(v):
    return "n/a" if v is None else f"{v:.3f}"
  lines = ["| fault | found by | planted | flagged | found | precision | recall |",
           "|---|---|---|---|---|---|---|"]
  for kind, r in result.items():
    by = r["reason"] or "(needs a model score)"
    lines.append(f"| {kind} | {by} | {r['planted']} | {r['flagged']} | {r['found']} | "
                 f"{num(r['precision'])} | {num(r['recall'])} |")
  return "\n".join(lines)


# ----------------------------------------------------------------------- CLI


class _Parser(argparse.ArgumentParser):
  """argparse whose errors are UserErrors (one line, exit 2) instead of usage dumps."""

  def error(self, message):
    raise UserError(message)


def _add_flags(p, cls, skip=()):
  """One flag per field of the dataclass cls: --name VALUE, or --no-name / --name for bools."""
  d = cls()
  for field in dataclasses.fields(cls):
    if field.name in skip:
      continue
    flag = "--" + field.name.replace("_", "-")
    default = getattr(d, field.name)
    if field.type in (bool, "bool"):
      if default:
        p.add_argument(f"--no-{flag[2:]}", dest=field.name, action="store_false",
                       help=f"turn off {field.name.replace('_', ' ')}")
      else:
        p.add_argument(flag, dest=field.name, action="store_true")
    else:
      kind = {"float": float, "int": int, "str": str}.get(field.type, field.type)
      p.add_argument(flag, type=kind, default=default, help=f"default {default!r}")


def _curate_parser():
  p = _Parser(prog="python -m unimm.data.curate", description=__doc__.split("\n")[0])
  p.add_argument("--input", action="append", required=True,
                 help="a converted folder (repeat for a mixture: duplicates across all)")
  p.add_argument("--output", required=True, help="a new folder, or a stopped curation's to resume")
  p.add_argument("--chunk", type=int, default=10_000,
                 help="input records per chunk (one shard each; the unit of resuming)")
  _add_flags(p, Filters)
  _add_flags(p, Models, skip=("batch_size",))
  p.add_argument("--judge-batch", dest="batch_size", type=int, default=0,
                 help="documents per judge call (default 64 for a unimm run, 16 for HF)")
  return p


_OUT = ("--output", {"required": True})
_SEED_SIZE = [("--seed", {"type": int, "default": 0}), ("--image-size", {"type": int, "default": 32})]
SUBCOMMANDS = {  # name: (description, [(flag, argparse keywords)])
    "corrupt": ("Writes a Shapes t2i folder with planted faults and faults.json.", [
        _OUT, ("--n", {"type": int, "default": 2000}),
        ("--rate", {"type": float, "default": 0.3, "help": "share of faulty records (all kinds)"}),
        *_SEED_SIZE, ("--kinds", {"default": ",".join(FAULT_KINDS)}),
        ("--two-object-prob", {"type": float, "default": 0.3, "help": "share of two-object "
                               "scenes (the rest have one), as data.two_object_prob"})]),
    "measure": ("Precision and recall of a curation against planted faults.", [
        ("--output", {"required": True, "help": "the curated folder (holds curation.parquet)"}),
        ("--truth", {"required": True, "help": "the faults.json `corrupt` wrote"})]),
    "stories": ("Writes an MMC4 shard of Shapes stories to mine edit pairs from.", [
        _OUT, ("--n", {"type": int, "default": 300}),
        ("--distractor-rate", {"type": float, "default": 0.3}),
        ("--repeat-rate", {"type": float, "default": 0.1}), *_SEED_SIZE]),
    "measure-mining": ("Mined edit pairs against the stories' truth.", [
        ("--output", {"required": True, "help": "the folder curated with --mine edits"}),
        ("--truth", {"required": True, "help": "the stories_truth.json `stories` wrote"}),
        ("--input", {"required": True, "help": "the converted stories folder that was mined"})]),
    "measure-captions": ("ShapesEval caption scores of a recaptioned Shapes folder.", [
        ("--output", {"required": True, "help": "the folder curated with --recaption"})]),
}


def _sub_args(name, argv):
  description, flags = SUBCOMMANDS[name]
  p = _Parser(prog=f"python -m unimm.data.curate {name}", description=description)
  for flag, kw in flags:
    p.add_argument(flag, **kw)
  return p.parse_args(argv)


def main(argv) -> dict:
  """Runs a curation (or `corrupt`, `stories`, `measure`, `measure-mining`,
  `measure-captions`); returns what the last stdout line prints."""
  argv = list(argv)
  if argv and argv[0] == "stories":
    a = _sub_args("stories", argv[1:])
    truth = stories(a.output, a.n, a.distractor_rate, a.repeat_rate, a.seed, a.image_size)
    print(json.dumps({"documents": truth["n"], "edits": truth["edits"],
                      "not_edits": truth["not_edits"]}), flush=True)
    return truth
  if argv and argv[0] == "measure-mining":
    a = _sub_args("measure-mining", argv[1:])
    result = measure_mining(a.output, a.truth, a.input)
    print(json.dumps(result), flush=True)
    return result
  if argv and argv[0] == "measure-captions":
    result = measure_captions(_sub_args("measure-captions", argv[1:]).output)
    print(json.dumps(result), flush=True)
    return result
  if argv and argv[0] == "corrupt":
    a = _sub_args("corrupt", argv[1:])
    truth = corrupt(a.output, a.n, a.rate, a.seed, a.image_size,
                    tuple(k for k in a.kinds.split(",") if k), a.two_object_prob)
    print(json.dumps({"documents": truth["n"], "faults": truth["counts"]}), flush=True)
    return truth
  if argv and argv[0] == "measure":
    a = _sub_args("measure", argv[1:])
    result = measure(a.output, a.truth)
    print(format_table(result), file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result
  a = _curate_parser().parse_args(argv)
  filters = Filters(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Filters)})
  models = Models(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Models)})
  summary = curate(a.input, a.output, filters, chunk=a.chunk, models=models)
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  cli(main)
