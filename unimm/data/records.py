"""Converted data on disk: ArrayRecord shards of canonical documents.

`python -m unimm.data.convert` writes, and the training pipeline reads, a
folder holding

    docs-00000.array_record, docs-00001.array_record, ...   (group_size:1)
    info.json      {"format", "documents", "images", "skipped", "repaired", "shards"}

Each record is one document (see `unimm.data.document`) packed with msgpack,
with every image kept as its encoded bytes (JPEG, PNG, WebP, ...):

    {"v": 1, "task": str,
     "segments": [{"kind": "text", "text": str, "loss": bool},
                  {"kind": "image", "bytes": bytes, "role": "condition" | "target"}, ...],
     "meta": {...JSON-able...}}

Images are checked once, at conversion (`check_image`): bad ones raise `Skip`
with a reason; 16-bit, CMYK, palette and alpha images are repaired to RGB PNG
and the repair is counted. The pipeline decodes, resizes and crops them to an
aspect-ratio bucket when it reads them (`decode_image`). An image file named on a
command line gets the same checks (`image_file`): a bad one is a one-line UserError.
"""

import collections
import glob
import io
import json
import os
import warnings

import msgpack
import numpy as np
from PIL import Image, ImageOps

from unimm.errors import UserError, one_line, read_json

VERSION = 1
SHARD_PATTERN = "docs-*.array_record"
INFO_FILE = "info.json"
ORIENTATION = 0x0112  # EXIF tag: how the camera was held
MAX_PIXELS = 1 << 26  # 67M pixels (8192 x 8192): larger headers are decompression bombs

# Skip reasons (conversion and pipeline count by these names).
EMPTY_IMAGE = "empty_image"            # zero bytes
UNDECODABLE_IMAGE = "undecodable_image"  # not an image PIL can open (garbage bytes)
TRUNCATED_IMAGE = "truncated_image"    # header fine, pixel data cut short
DECOMPRESSION_BOMB = "decompression_bomb"
MISSING_IMAGE = "missing_image"        # file absent / null bytes
# Repairs (the record is kept).
REPAIR_16BIT = "16bit_image"
REPAIR_CMYK = "cmyk_image"
REPAIR_PALETTE = "palette_image"
REPAIR_ALPHA = "alpha_image"
REPAIR_GRAY = "grayscale_image"
REPAIR_TEXT = "non_utf8_text"


class Skip(Exception):
  """A record (or, in interleaved documents, one image) that cannot be used.

  `reason` is a short snake_case name counted in reports and metrics."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason
    self.detail = detail


# ------------------------------------------------------------------- images


def check_image(data, max_pixels: int = MAX_PIXELS):
  """Encoded image bytes -> (bytes to store, repair reason or None).

  Raises Skip(EMPTY_IMAGE | UNDECODABLE_IMAGE | TRUNCATED_IMAGE |
  DECOMPRESSION_BOMB). The size is read from the header before any pixel is
  decoded, so a bomb costs nothing. RGB and 8-bit grayscale images are stored
  as they came; others are converted to RGB and stored as PNG.
  """
  if data is None:
    raise Skip(MISSING_IMAGE)
  data = bytes(data)
  img = _open(data, max_pixels)
  try:
    img.load()
  except Exception as e:
    raise Skip(TRUNCATED_IMAGE, f"{type(e).__name__}: {e}") from None
  repair = _repair_reason(img)
  if repair is None:
    return data, None
  return _png(_to_rgb(img)), repair


# How a reason reads in a message about one file ("--image x.png is ...").
DESCRIPTIONS = {
    EMPTY_IMAGE: "empty (0 bytes)",
    UNDECODABLE_IMAGE: "not an image PIL can read",
    TRUNCATED_IMAGE: "truncated or corrupt",
    DECOMPRESSION_BOMB: "a decompression bomb",
    MISSING_IMAGE: "missing",
    REPAIR_16BIT: "a 16-bit image",
    REPAIR_CMYK: "a CMYK image",
    REPAIR_PALETTE: "a palette image",
    REPAIR_ALPHA: "an image with transparency (composited on black)",
    REPAIR_GRAY: "a grayscale image",
}


def image_file(path, flag, size=None, max_pixels: int = MAX_PIXELS):
  """An image file named on the command line (flag: how the message names it, e.g.
  "--image") -> (uint8 RGB [H, W, 3] as `decode_image` gives it for `size`, the repair
  reason of `check_image` or None). A missing or unreadable file, or one check_image skips
  (empty, not an image, truncated, a decompression bomb), is a one-line UserError naming
  the file and the problem; 16-bit, CMYK, palette and alpha images are converted to 8-bit
  RGB, as `unimm.data.convert` repairs them (`repair_note` says so)."""
  if not os.path.isfile(path):
    raise UserError(f"{flag} {path} " + ("is a folder, not an image file" if os.path.isdir(path)
                                          else "does not exist"))
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"{flag} {path} cannot be read ({e.strerror or e})") from None
  try:
    fixed, repair = check_image(data, max_pixels)
    return decode_image(fixed, size=size, max_pixels=max_pixels), repair
  except Skip as e:
    detail = "" if not e.detail or e.reason == UNDECODABLE_IMAGE else f" ({one_line(e.detail)})"
    raise UserError(f"{flag} {path} is {DESCRIPTIONS.get(e.reason, e.reason)}{detail}: give a "
                    "PNG, JPEG, WebP, BMP or TIFF image") from None


def repair_note(flag, path, repair):
  """The one line that says an image file named on the command line was converted."""
  return f"note: {flag} {path} is {DESCRIPTIONS.get(repair, repair)}: converted to 8-bit RGB"


def _open(data, max_pixels):
  """PIL image of encoded bytes, header read only; Skip for empty or garbage
  bytes and for more than max_pixels pixels (a decompression bomb)."""
  if not data:
    raise Skip(EMPTY_IMAGE)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise Skip(DECOMPRESSION_BOMB, str(e)) from None
  except Exception as e:  # PIL raises many types for garbage
    raise Skip(UNDECODABLE_IMAGE, f"{type(e).__name__}: {e}") from None
  w, h = img.size
  if w * h > max_pixels:
    raise Skip(DECOMPRESSION_BOMB, f"{w}x{h} pixels > {max_pixels}")
  if w < 1 or h < 1:
    raise Skip(UNDECODABLE_IMAGE, f"size {w}x{h}")
  return img


def _repair_reason(img):
  mode = img.mode
  if mode in ("RGB", "L") and img.info.get("bits", 8) <= 8:
    return None  # decode_image turns gray into RGB when it reads it
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F") or img.info.get("bits", 8) > 8:
    return REPAIR_16BIT
  if mode == "CMYK":
    return REPAIR_CMYK
  if mode == "P" or mode == "PA":
    return REPAIR_PALETTE
  if mode in ("RGBA", "LA", "La", "RGBa"):
    return REPAIR_ALPHA
  return REPAIR_GRAY if mode in ("L", "1") else f"{mode.lower()}_image"


def _to_rgb(img):
  """Any PIL mode -> 8-bit RGB (alpha composited on black, 16-bit scaled)."""
  mode = img.mode
  if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
    a = np.asarray(img, dtype=np.float64)
    top = 65535.0 if mode.startswith("I;16") or a.max() > 255 else 255.0
    a = np.clip(np.round(a / top * 255.0), 0, 255).astype(np.uint8)
    return Image.fromarray(a, "L").convert("RGB")
  if mode == "P" and "transparency" in img.info:
    img = img.convert("RGBA")
  if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
    rgba = img.convert("RGBA")
    out = Image.new("RGB", rgba.size, (0, 0, 0))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out
  return img.convert("RGB")


def _png(img):
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  return buf.getvalue()


def decode_image(data, size=None, bucket=None, max_pixels: int = MAX_PIXELS):
  """Encoded bytes -> uint8 RGB array [H, W, 3].

  size=(h, w), or bucket: a function aspect (w / h) -> (h, w), resizes the
  image to cover (h, w) and centre-crops it (a JPEG is first decoded at a
  reduced scale where that still covers the target: PIL's draft mode).
  EXIF orientation is applied (phone photos stand upright). Raises Skip for
  bytes that are not a usable image (empty, garbage, truncated, larger than
  max_pixels).
  """
  img = _open(data, max_pixels)
  w0, h0 = img.size
  try:
    orientation = img.getexif().get(ORIENTATION, 1) if img.format in ("JPEG", "WEBP") else 1
    turned = orientation in (5, 6, 7, 8)  # EXIF rotations by 90 degrees swap width and height
    if size is None and bucket is not None:
      size = bucket(h0 / w0 if turned else w0 / h0)
    if size is not None and img.format == "JPEG":
      img.draft("RGB", (size[0], size[1]) if turned else (size[1], size[0]))
    if orientation != 1:
      img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
      img = _to_rgb(img)
    if size is not None:
      img = cover(img, size)
    return np.asarray(img, dtype=np.uint8)
  except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for cut or corrupt data
    raise Skip(TRUNCATED_IMAGE, f"{type(e).__name__}: {e}") from None


def cover(img, size):
  """A PIL image resized (bicubic) to cover (h, w) = size and centre-cropped to it, as the
  data pipeline reads images; unchanged if it already has that size."""
  if img.size == (size[1], size[0]):
    return img
  return img.resize((size[1], size[0]), Image.Resampling.BICUBIC,
                    box=_cover_box(img.size, size), reducing_gap=3.0)


def _cover_box(have, size):
  """The centred crop box of an image of size `have` (w, h) with the aspect of
  `size` (h, w): resizing it to size covers the target and crops the rest."""
  w, h = have
  scale = max(size[1] / w, size[0] / h)
  cw, ch = size[1] / scale, size[0] / scale
  left, top = max(0.0, (w - cw) / 2), max(0.0, (h - ch) / 2)  # rounding can give -1e-15
  return (left, top, min(float(w), left + cw), min(float(h), top + ch))


# -------------------------------------------------------------------- text


def as_text(value):
  """A text field -> (str, repair reason or None). Bytes that are not UTF-8
  are decoded with replacement characters (counted as REPAIR_TEXT); None
  raises Skip("missing_text")."""
  if value is None:
    raise Skip("missing_text")
  if isinstance(value, str):
    return value, None
  if isinstance(value, (bytes, bytearray, memoryview)):
    value = bytes(value)
    try:
      return value.decode("utf-8"), None
    except UnicodeDecodeError:
      return value.decode("utf-8", errors="replace"), REPAIR_TEXT
  raise Skip("bad_schema", f"text is {type(value).__name__}")


# ----------------------------------------------------------------- records


# ------------------------------------------------------------- latent caches

BAD_LATENT = "bad_latent"
LATENT_DTYPES = {"float16": "<f2", "float32": "<f4", "int32": "<i4"}


def latent_field(array) -> dict:
  """A latent [h, w, c] (stored float16) or code map [h, w] (stored int32) -> an image
  segment's "latent" field (a latent cache, `python -m unimm.tokenize encode`)."""
  array = np.asarray(array)
  dtype = "int32" if np.issubdtype(array.dtype, np.integer) else "float16"
  data = np.ascontiguousarray(array.astype(LATENT_DTYPES[dtype]))
  return {"dtype": dtype, "shape": list(array.shape), "data": data.tobytes()}


def read_latent(segment) -> np.ndarray:
  """An image segment of a latent cache -> its latent (float16 [h, w, c]) or codes
  (int32 [h, w]), as stored. Raises Skip("bad_latent") for a segment without a
  well-formed "latent" field (the pipeline counts it like any bad record)."""
  lat = segment.get("latent") if isinstance(segment, dict) else None
  try:
    dtype = np.dtype(LATENT_DTYPES[lat["dtype"]])
    shape = tuple(int(s) for s in lat["shape"])
    return np.frombuffer(lat["data"], dtype=dtype).reshape(shape)
  except Exception as e:  # missing keys, unknown dtype, wrong number of bytes
    raise Skip(BAD_LATENT, f"{type(e).__name__}: {e}") from None


def pack(doc) -> bytes:
  """A document whose image segments hold `bytes` (the encoded image) and/or `latent`
  (a tokenizer's output, {"dtype", "shape", "data"}: a latent cache) -> one record."""
  segments = []
  for seg in doc["segments"]:
    if seg["kind"] == "text":
      segments.append({"kind": "text", "text": seg["text"], "loss": bool(seg.get("loss", True))})
    else:
      out = {"kind": "image", "role": seg["role"]}
      if "bytes" in seg:
        out["bytes"] = bytes(seg["bytes"])
      if "latent" in seg:
        lat = seg["latent"]
        out["latent"] = {"dtype": str(lat["dtype"]), "shape": [int(n) for n in lat["shape"]],
                         "data": bytes(lat["data"])}
      if len(out) == 2:
        raise ValueError("an image segment needs 'bytes' or 'latent'")
      segments.append(out)
  return msgpack.packb({"v": VERSION, "task": doc["task"], "segments": segments,
                        "meta": doc.get("meta") or {}}, use_bin_type=True)


def unpack(record: bytes) -> dict:
  """One record -> document dict (image segments hold "bytes" and/or "latent").
  Raises Skip("malformed_record") for anything that is not such a record."""
  try:
    doc = msgpack.unpackb(record, raw=False)
    segments = doc["segments"]
    if not isinstance(segments, list) or not all(
        s["kind"] == "text" and isinstance(s["text"], str)
        or s["kind"] == "image" and (isinstance(s.get("bytes"), bytes) or isinstance(
            s.get("latent", {}).get("data"), bytes)) for s in segments):
      raise ValueError("bad segments")
  except Exception as e:
    raise Skip("malformed_record", f"{type(e).__name__}: {e}") from None
  return doc


class Stats:
  """Counts of a conversion: documents, images, skips and repairs by reason."""

  def __init__(self):
    self.documents = 0
    self.images = 0
    self.skipped = collections.Counter()
    self.repaired = collections.Counter()

  def skip(self, reason, n=1):
    self.skipped[reason] += n

  def repair(self, reason, n=1):
    if reason:
      self.repaired[reason] += n

  def summary(self) -> dict:
    return {"documents": self.documents, "images": self.images,
            "skipped": dict(sorted(self.skipped.items())),
            "repaired": dict(sorted(self.repaired.items()))}


class ShardWriter:
  """Writes packed documents into `directory/docs-NNNNN.array_record`."""

  def __init__(self, directory, docs_per_shard=10_000):
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
    self._writer_cls = ArrayRecordWriter
    self.directory = directory
    self.docs_per_shard = int(docs_per_shard)
    os.makedirs(directory, exist_ok=True)
    old = glob.glob(os.path.join(directory, SHARD_PATTERN))
    if old:
      raise UserError(f"output folder {directory} already holds {len(old)} shard(s): "
                      "choose an empty --output folder")
    self.shards, self._writer, self._count = [], None, 0

  def write(self, doc):
    if self._writer is None or self._count >= self.docs_per_shard:
      self._close_shard()
      name = f"docs-{len(self.shards):05d}.array_record"
      self.shards.append(name)
      self._writer = self._writer_cls(os.path.join(self.directory, name), "group_size:1")
      self._count = 0
    self._writer.write(pack(doc))
    self._count += 1

  def _close_shard(self):
    if self._writer is not None:
      self._writer.close()
      self._writer = None

  def close(self, info: dict):
    self._close_shard()
    with open(os.path.join(self.directory, INFO_FILE), "w") as f:
      json.dump(dict(info, shards=self.shards), f, indent=1)


def read_info(directory) -> dict:
  """A converted folder's info.json; a one-line UserError naming the file when it is missing
  (the conversion did not finish: convert writes it last) or not a JSON object."""
  path = os.path.join(directory, INFO_FILE)
  try:
    return read_json(path, "the file is damaged; copy the folder again or convert again",
                     "the object `python -m unimm.data.convert` writes")
  except FileNotFoundError:
    raise UserError(f"data source {directory!r} has no {INFO_FILE}: its conversion did not "
                    "finish (`python -m unimm.data.convert` writes it last); convert again") from None


def shard_paths(directory):
  """The ArrayRecord shards of a converted folder, sorted; a one-line UserError for a folder
  that is not one (no shards), whose info.json is missing or damaged, or that lacks a shard
  its info.json lists."""
  if not os.path.isdir(directory):
    raise UserError(f"data source {directory!r} is not a folder: give a folder written by "
                    "`python -m unimm.data.convert`")
  paths = sorted(glob.glob(os.path.join(directory, SHARD_PATTERN)))
  if paths or os.path.exists(os.path.join(directory, INFO_FILE)):
    listed = read_info(directory).get("shards")
    listed = listed if isinstance(listed, list) else []
    missing = [str(n) for n in listed if not os.path.isfile(os.path.join(directory, str(n)))]
    if missing:
      raise UserError(f"data source {directory!r} lacks {missing[0]} ({len(missing)} of the "
                      f"{len(listed)} shards its {INFO_FILE} lists are missing): copy the folder "
                      "again or convert again")
  if not paths:
    raise UserError(f"data source {directory!r} holds no {SHARD_PATTERN} files: convert your "
                    "data with `python -m unimm.data.convert --format ... --output "
                    f"{directory}`")
  return paths


def shard_error(paths, error) -> UserError:
  """The one-line UserError of shards that ArrayRecord could not open (`error`): it names the
  first of `paths` that does not open (a damaged or cut-short file)."""
  for path in paths:
    try:
      open_shard(path).close()
    except UserError as e:
      return e
  return UserError(f"the shards of {os.path.dirname(paths[0])} cannot be read "
                   f"({type(error).__name__}: {one_line(error)})")


def open_shard(path):
  """An ArrayRecordReader of one shard; a one-line UserError naming a damaged one."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=import-outside-toplevel
  reader = None
  try:
    reader = ArrayRecordReader(path)
    ok = reader.ok()
  except Exception:  # noqa: BLE001 - ArrayRecord raises RuntimeError, often with no message
    ok = False
  if ok:
    return reader
  try:
    if reader is not None:
      reader.close()  # (raises the reader's error, which says little: "should be at least 64KB")
  except Exception:  # noqa: BLE001
    pass
  size = os.path.getsize(path) if os.path.isfile(path) else 0
  raise UserError(f"{path} is not a readable ArrayRecord shard ({size} bytes, no valid footer): "
                  "the file is damaged or cut short; copy it again or convert again")
