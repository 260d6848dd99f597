"""Curates converted folders: measures every record, filters, deduplicates, writes a new folder.

    python -m unimm.data.curate --input DIR [--input DIR ...] --output DIR [filter flags]
    python -m unimm.data.curate corrupt --output DIR [--n 2000] [--rate 0.3] [--seed 0]
    python -m unimm.data.curate measure --output DIR --truth DIR/faults.json

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
    exact_duplicate      the same decoded pixels (sha256) as an earlier kept document
    near_duplicate       perceptual hash (`phash`) within --phash-distance bits (of 3072) of an earlier kept document

Duplicates are looked for across all input folders and the first one is kept. Kept
documents go, unchanged, to DIR/docs-NNNNN.array_record (one shard per chunk of --chunk
input records) with DIR/info.json (written last, as by convert), so DIR is a data source
for `data.mixture`. DIR/curation.parquet holds one row per input record: source folder,
record id, every measured property, decision ("keep" / "drop"), reason and, for a
duplicate, the record it repeats. A run stopped part-way and started again with the same
arguments resumes after the last finished chunk (DIR/curate_state.json) and writes each
record once. The last stdout line is one JSON object

    {"read": N, "kept": N, "dropped": {reason: n, ...}, "written": N}

`corrupt` writes a Shapes text-to-image folder with planted faults at known positions and
`measure` scores a curation against them (see `corrupt` and `measure`).
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
FAULTS_FILE = "faults.json"
HASH_INPUT = 32    # phash: each colour channel of the image resized to 32x32, vs mid-grey
HASH_BITS = 3 * HASH_INPUT * HASH_INPUT
# Planted fault kinds (corrupt) -> the curation reason that should find each one.
FAULT_KINDS = ("wrong_caption", "near_duplicate", "exact_duplicate", "flat_image")
FINDS = {"near_duplicate": "near_duplicate", "exact_duplicate": "exact_duplicate",
         "flat_image": "flat_image", "wrong_caption": None}  # None: needs a model score


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


def _write_chunk(output, chunk, docs, rows):
  """A chunk's shard (if it kept any document) and table part, each written whole then renamed."""
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
  parts = os.path.join(output, PARTS_DIR)
  os.makedirs(parts, exist_ok=True)
  path = os.path.join(parts, f"part-{chunk:05d}.parquet")
  pq.write_table(pa.Table.from_pylist(rows, schema=TABLE_SCHEMA), path + ".tmp")
  os.replace(path + ".tmp", path)
  return name


def _table_schema():
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  f64, i64, s = pa.float64(), pa.int64(), pa.string()
  return pa.schema([("source", s), ("record", i64), ("task", s), ("images", i64),
                    ("width", i64), ("height", i64), ("aspect", f64), ("std", f64),
                    ("entropy", f64), ("jpeg_quality", i64), ("chars", i64), ("words", i64),
                    ("letter_share", f64), ("sha256", s), ("phash", s), ("decision", s),
                    ("reason", s), ("duplicate_of", s), ("hamming", i64)])


TABLE_SCHEMA = None  # set on first use (pyarrow is imported lazily)


def curate(inputs, output, filters: Filters | None = None, chunk: int = 10_000,
           stop_after: int | None = None, progress: bool = True) -> dict:
  """Curates the converted folders `inputs` into `output`; returns the summary (see the module
  docstring). stop_after=k stops after k chunks of this call, as an interruption would (for
  tests); a later call with the same arguments resumes."""
  global TABLE_SCHEMA  # pylint: disable=global-statement
  import pyarrow as pa  # pylint: disable=import-outside-toplevel
  import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  TABLE_SCHEMA = TABLE_SCHEMA or _table_schema()
  filters = filters or Filters()
  if chunk < 1:
    raise UserError(f"--chunk must be >= 1, got {chunk}")
  if not inputs:
    raise UserError("give at least one --input folder (written by python -m unimm.data.convert)")
  folders = [os.path.abspath(str(d)) for d in inputs]
  output = os.path.abspath(str(output))
  if output in folders:
    raise UserError(f"--output {output} is also an --input: choose a new folder")
  plan = _inputs(folders)
  total = sum(n for _, shards in plan for _, n in shards)
  settings = {"inputs": folders, "records": total, "chunk": int(chunk),
              "filters": dataclasses.asdict(filters)}
  state_path = os.path.join(output, STATE_FILE)
  state = {"done": 0, "read": 0, "kept": 0, "images": 0, "dropped": {}, "shards": []}
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
  start = state["done"] * chunk
  bar = tqdm(total=total, initial=start, desc="curate", unit=" docs", file=sys.stderr,
             dynamic_ncols=True, disable=not progress)
  stream = _stream(plan, start)
  ran = 0
  for c in range(state["done"], chunks):
    if stop_after is not None and ran >= stop_after:
      break
    docs, rows, images = [], [], 0
    dropped = dict(state["dropped"])
    for _ in range(min(chunk, total - c * chunk)):
      folder, rid, rec = next(stream)
      doc, row, reason = measure_record(rec, filters)
      row = dict(row, source=folder, record=rid, duplicate_of=None, hamming=None)
      if reason is None and row["sha256"]:
        found = dedup.find(row["sha256"], _hashes(row))
        if found:
          reason, row["duplicate_of"], row["hamming"] = found
      if reason is None:
        docs.append(bytes(rec))
        images += row["images"]
        if row["sha256"]:
          dedup.add(row["sha256"], _hashes(row), f"{folder}:{rid}")
      else:
        dropped[reason] = dropped.get(reason, 0) + 1
      rows.append(dict(row, decision="keep" if reason is None else "drop", reason=reason))
      bar.update(1)
    name = _write_chunk(output, c, docs, rows)
    state = {"done": c + 1, "read": state["read"] + len(rows), "kept": state["kept"] + len(docs),
             "images": state["images"] + images, "dropped": dict(sorted(dropped.items())),
             "shards": state["shards"] + ([name] if name else [])}
    _write_json(state_path, {"settings": settings, "state": state})
    ran += 1
  bar.close()
  summary = {"read": state["read"], "kept": state["kept"], "dropped": state["dropped"],
             "written": state["kept"]}
  if state["done"] < chunks:
    return dict(summary, finished=False)
  info_path = os.path.join(output, records.INFO_FILE)
  if not os.path.exists(info_path):
    parts = [os.path.join(output, PARTS_DIR, f"part-{c:05d}.parquet") for c in range(chunks)]
    table = pa.concat_tables([pq.read_table(p) for p in parts]) if parts \
        else TABLE_SCHEMA.empty_table()
    pq.write_table(table, os.path.join(output, TABLE_FILE))
    if not state["kept"]:
      print(f"warning: curation kept no document of {total} (dropped: {state['dropped']})",
            file=sys.stderr)
    with open(info_path + ".tmp", "w") as fp:  # last: the folder is complete
      json.dump({"format": "curated", "input": folders, "documents": state["kept"],
                 "images": state["images"], "skipped": {}, "repaired": {},
                 "curation": summary, "filters": dataclasses.asdict(filters),
                 "shards": state["shards"]}, fp, indent=1)
    os.replace(info_path + ".tmp", info_path)
  return summary


# ------------------------------------------------------------ Shapes with faults


def corrupt(output, n: int = 2000, rate: float = 0.3, seed: int = 0, image_size: int = 32,
            kinds=FAULT_KINDS) -> dict:
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
      scene = shapes.random_scene(rng, 2 if rng.random() < 0.7 else 1)
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


def _curate_parser():
  p = _Parser(prog="python -m unimm.data.curate", description=__doc__.split("\n")[0])
  p.add_argument("--input", action="append", required=True,
                 help="a converted folder (repeat for a mixture: duplicates across all)")
  p.add_argument("--output", required=True, help="a new folder, or a stopped curation's to resume")
  p.add_argument("--chunk", type=int, default=10_000,
                 help="input records per chunk (one shard each; the unit of resuming)")
  d = Filters()
  for field in dataclasses.fields(Filters):
    if field.type in (bool, "bool"):
      p.add_argument(f"--no-{field.name.replace('_', '-')}", dest=field.name,
                     action="store_false", help=f"turn off {field.name.replace('_', ' ')}")
    else:
      kind = float if field.type in (float, "float") else int
      p.add_argument(f"--{field.name.replace('_', '-')}", type=kind,
                     default=getattr(d, field.name), help=f"default {getattr(d, field.name)}")
  return p


def _corrupt_parser():
  p = _Parser(prog="python -m unimm.data.curate corrupt",
              description="Writes a Shapes t2i folder with planted faults and faults.json.")
  p.add_argument("--output", required=True)
  p.add_argument("--n", type=int, default=2000)
  p.add_argument("--rate", type=float, default=0.3, help="share of faulty records (all kinds)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--image-size", type=int, default=32)
  p.add_argument("--kinds", default=",".join(FAULT_KINDS))
  return p


def _measure_parser():
  p = _Parser(prog="python -m unimm.data.curate measure",
              description="Precision and recall of a curation against planted faults.")
  p.add_argument("--output", required=True, help="the curated folder (holds curation.parquet)")
  p.add_argument("--truth", required=True, help="the faults.json `corrupt` wrote")
  return p


def main(argv) -> dict:
  """Runs a curation (or `corrupt`, `measure`); returns what the last stdout line prints."""
  argv = list(argv)
  if argv and argv[0] == "corrupt":
    a = _corrupt_parser().parse_args(argv[1:])
    truth = corrupt(a.output, a.n, a.rate, a.seed, a.image_size,
                    tuple(k for k in a.kinds.split(",") if k))
    print(json.dumps({"documents": truth["n"], "faults": truth["counts"]}), flush=True)
    return truth
  if argv and argv[0] == "measure":
    a = _measure_parser().parse_args(argv[1:])
    result = measure(a.output, a.truth)
    print(format_table(result), file=sys.stderr)
    print(json.dumps(result), flush=True)
    return result
  a = _curate_parser().parse_args(argv)
  filters = Filters(**{f.name: getattr(a, f.name) for f in dataclasses.fields(Filters)})
  summary = curate(a.input, a.output, filters, chunk=a.chunk)
  print(json.dumps(summary), flush=True)
  return summary


if __name__ == "__main__":
  cli(main)
