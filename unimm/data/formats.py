"""Readers of public dataset formats into canonical documents.

`read(fmt, input_path, stats=...)` yields documents as `unimm.data.records`
stores them (image segments hold checked, encoded `bytes`):

    format           input                                  documents (task: segments)
    img2dataset      *.parquet (--output_format parquet)    t2i: caption, image(target)
    webdataset       *.tar ({key}.jpg|png|webp/.txt/.json)  t2i
    tfds             a TFDS data_dir (--name DATASET)       t2i
    instructpix2pix  HF *.parquet                           edit: image(condition), text,
                                                            image(target)
    hq_edit          HF *.parquet (UCSC-VLAA/HQ-Edit)       edit
    mmc4             *.jsonl | *.jsonl.zip + images folder  interleaved: texts, images(condition)
    obelics          HF *.parquet + images folder           interleaved
    omnigen          OmniGen X2I *.jsonl + images folder    task_type: texts, images(condition),
                                                            image(target)

`input_path` is one file or a folder of shards (its files with the format's
extension, sorted). Problems with the input as a whole (missing file or
folder, no shards, a parquet file without the required columns, an unknown
TFDS dataset) raise a one-line `UserError` before anything is read.

Problems with one record are counted in `stats` by reason, never raised:
- Pairs, edits and subject-driven rows refer to every image in their text, so
  one bad image skips the whole record (its reason counted once).
- In interleaved documents a bad image or a malformed position is dropped and
  counted by reason; the document is kept while one image remains, else it is
  skipped as "no_images".
- Rows of the wrong shape: "bad_schema"; unparsable JSON: "bad_json"; a null
  text: "missing_text"; an absent image file or null image: "missing_image";
  bad image bytes: the `records.check_image` reasons.
Repairs (16-bit, CMYK, palette, alpha images; non-UTF-8 text) are counted in
`stats.repaired` for the documents that are yielded. `stats.documents` and
`stats.images` count what is yielded.
"""

import glob
import hashlib
import json
import os
import re
import tarfile
import zipfile

import pyarrow as pa
import pyarrow.parquet as pq

from unimm.data import records
from unimm.data.records import Skip
from unimm.errors import UserError

FORMATS = ("img2dataset", "webdataset", "tfds", "instructpix2pix", "hq_edit", "mmc4", "obelics",
           "omnigen")

# Skip reasons of this module (records.py names the image ones).
BAD_SCHEMA = "bad_schema"
BAD_JSON = "bad_json"
MISSING_TEXT = "missing_text"
NO_IMAGES = "no_images"
BAD_POSITION = "bad_position"  # interleaved: index out of range; both or neither of text, image
PLACEHOLDER_MISMATCH = "placeholder_mismatch"

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_PARQUET_BATCH = 64
_PLACEHOLDER = re.compile(r"<img><\|image_(\d+)\|></img>")
_SURROGATE = re.compile("[\ud800-\udfff]")


def read(fmt, input_path, *, stats, images_dir=None, name=None, split="train",
         max_pixels=records.MAX_PIXELS, columns=None):
  """Documents of `input_path` in format `fmt` (one of FORMATS), counted in `stats`.

  Args:
    fmt: the format name.
    input_path: a file, or a folder of shards; for "tfds", the TFDS data_dir.
    stats: a `records.Stats` that receives documents, images, skips and repairs.
    images_dir: where mmc4 / obelics / omnigen image files are (default: see
      each format).
    name: the TFDS dataset name ("tfds" only).
    split: the TFDS split.
    max_pixels: images with more pixels are skipped as decompression bombs.
    columns: img2dataset only: {"caption": name, "image": name, "url": name}, the parquet
      columns to read instead of img2dataset's own (None or absent: the defaults), for
      parquet variants such as LAION metadata with image bytes or Hugging Face exports.

  Returns:
    An iterator of documents. The input is checked when `read` is called; a
    UserError says what is wrong with it.
  """
  if fmt not in FORMATS:
    raise UserError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
  input_path = os.fspath(input_path) if input_path is not None else None
  images_dir = os.fspath(images_dir) if images_dir is not None else None
  columns = {k: v for k, v in (columns or {}).items() if v}
  if columns and fmt != "img2dataset":
    flags = ", ".join(f"--{k}-column" for k in columns)
    raise UserError(f"{flags} apply to --format img2dataset (parquet image-text pairs), "
                    f"not {fmt}")
  if fmt == "tfds":
    items = _tfds(input_path, name, split, max_pixels, stats)
  elif fmt == "img2dataset":
    items = _img2dataset(input_path, images_dir, max_pixels, stats, columns)
  else:
    items = _READERS[fmt](input_path, images_dir, max_pixels, stats)
  return _counted(items, stats)


def _counted(items, stats):
  """The one place where yielded documents, their images and repairs are counted."""
  for doc, repairs in items:
    for reason in repairs:
      stats.repair(reason)
    stats.documents += 1
    stats.images += sum(seg["kind"] == "image" for seg in doc["segments"])
    yield doc


# ------------------------------------------------------------------ helpers


class _Record:
  """Builds the segments of one record; its repairs count only if it is kept."""

  def __init__(self, max_pixels):
    self.max_pixels = max_pixels
    self.repairs = []

  def note(self, repair):
    if repair:
      self.repairs.append(repair)

  def text(self, value, loss=True, required=False):
    """A text segment; `required`: a blank text is Skip("missing_text")."""
    text, repair = records.as_text(value)
    text, repair2 = _utf8_safe(text)
    if required and not text.strip():
      raise Skip(MISSING_TEXT, "blank")
    self.note(repair or repair2)
    return {"kind": "text", "text": text, "loss": loss}

  def image(self, data, role):
    data, repair = records.check_image(_image_bytes(data), self.max_pixels)
    self.note(repair)
    return {"kind": "image", "bytes": data, "role": role}

  def image_file(self, path, role):
    return self.image(_read_file(path), role)


def _each(rows, build, max_pixels, stats):
  """(doc, repairs) for each row that `build(rec, row)` turns into a document.

  `rows` yields (row, repairs) pairs, or a Skip for a row that could not be read."""
  for item in rows:
    if isinstance(item, Skip):
      stats.skip(item.reason)
      continue
    row, repairs = item
    rec = _Record(max_pixels)
    for r in repairs:
      rec.note(r)
    try:
      doc = build(rec, row)
    except Skip as e:
      stats.skip(e.reason)
      continue
    yield doc, rec.repairs


def _doc(task, segments, meta):
  return {"task": task, "segments": segments, "meta": meta}


def _utf8_safe(text):
  """Strings with lone surrogates (from JSON escapes) cannot be stored: replace them."""
  try:
    text.encode("utf-8")
    return text, None
  except UnicodeEncodeError:
    return _SURROGATE.sub("\ufffd", text), records.REPAIR_TEXT


def _image_bytes(value):
  """An image field (bytes, or an HF {bytes, path} struct) -> bytes; Skip otherwise."""
  if isinstance(value, dict):
    value = value.get("bytes")
  if value is None:
    raise Skip(records.MISSING_IMAGE)
  if isinstance(value, (bytes, bytearray, memoryview)):
    return bytes(value)
  raise Skip(BAD_SCHEMA, f"image is {type(value).__name__}")


def _read_file(path):
  try:
    with open(path, "rb") as f:
      return f.read()
  except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
    raise Skip(records.MISSING_IMAGE, path) from None


def _meta(value):
  """A JSON-able copy of value (str, numbers, bools, None, lists, dicts); other leaves dropped."""
  if value is None or isinstance(value, (bool, int, float)):
    return value
  if isinstance(value, str):
    return _utf8_safe(value)[0]
  if isinstance(value, (list, tuple)):
    return [_meta(v) for v in value if _is_meta(v)]
  if isinstance(value, dict):
    return {str(k): _meta(v) for k, v in value.items() if _is_meta(v)}
  return None


def _is_meta(value):
  return value is None or isinstance(value, (bool, int, float, str, list, tuple, dict))


def _scalar_meta(row, exclude=()):
  """The scalar fields of a row (str, numbers, bools), minus `exclude`."""
  return {k: _meta(v) for k, v in row.items()
          if k not in exclude and (v is None or isinstance(v, (bool, int, float, str)))}


def _require(row, *keys):
  missing = [k for k in keys if k not in row]
  if missing:
    raise Skip(BAD_SCHEMA, f"missing {missing}")


def _files(input_path, patterns):
  """`input_path` itself, or its files matching `patterns`, sorted."""
  if not input_path or not os.path.exists(input_path):
    raise UserError(f"--input {input_path!r} does not exist")
  if os.path.isfile(input_path):
    return [input_path]
  paths = sorted({p for pat in patterns for p in glob.glob(os.path.join(input_path, pat))})
  paths = [p for p in paths if os.path.isfile(p)]
  if not paths:
    raise UserError(f"--input folder {input_path!r} holds no {' or '.join(patterns)} files")
  return paths


def _images_dir(images_dir, default):
  """--images, else `default`; a UserError if that folder does not exist."""
  path = images_dir or default
  if not os.path.isdir(path):
    how = "" if images_dir else " (the default; pass --images FOLDER)"
    raise UserError(f"images folder {path!r} does not exist{how}")
  return path


def _beside(input_path, folder="images"):
  """`folder` next to the input file or folder (or, for a folder, inside it if only that exists)."""
  path = os.path.abspath(input_path)
  beside = os.path.join(os.path.dirname(path), folder)
  inside = os.path.join(path, folder)
  if not os.path.isdir(beside) and os.path.isdir(inside):
    return inside
  return beside


# ------------------------------------------------------------------ parquet


def _parquet_files(input_path, required, fmt, hint="", check=None):
  """[(path, column names)] of the parquet shards; a UserError naming missing columns
  (then `hint`), after `check(path, names)` of each shard (if given).

  `required` holds column names, or tuples of alternatives (any one will do)."""
  out = []
  for path in _files(input_path, ["*.parquet"]):
    try:
      names = pq.read_schema(path).names
    except Exception as e:  # pyarrow raises several types for non-parquet files
      raise UserError(f"{path} is not a readable parquet file ({type(e).__name__}: {e})") from None
    if check:
      check(path, names)
    missing = [c if isinstance(c, str) else " or ".join(c) for c in required
               if not (c in names if isinstance(c, str) else any(a in names for a in c))]
    if missing:
      raise UserError(f"{path} is not {fmt} parquet: missing column(s) {', '.join(missing)}; "
                      f"it has {', '.join(names)}{hint}")
    out.append((path, names))
  return out


def _parquet_rows(path, columns=None):
  pf = pq.ParquetFile(path)
  for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, columns=columns):
    for row in batch.to_pylist():
      yield row, ()


def _first(names, options):
  return next(c for c in options if c in names)


# ------------------------------------------------------------ t2i: pairs


def _pair(rec, caption, image, meta):
  return _doc("t2i", [rec.text(caption, required=True), rec.image(image, "target")], meta)


def _img2dataset(input_path, images_dir, max_pixels, stats, columns=None):
  """img2dataset parquet: `url`, `caption` (with --caption_col; old versions
  also `txt`), `key`, `status`, `error_message`, `width`, `height`,
  `original_width`, `original_height`, [`exif`], [`sha256`], and the image
  bytes in a column named by --encode_format (`jpg`, `png` or `webp`), null
  where the download failed.

  `columns` ({"caption", "image", "url"}: column names) reads parquet variants instead, e.g.
  LAION metadata (`URL`, `TEXT`, `WIDTH`, `HEIGHT`, ...) with an image-bytes column, or a
  Hugging Face export (an image column of {bytes, path} structs): the image column holds
  bytes or such structs; the url column is kept as meta["url"] (nothing is downloaded)."""
  del images_dir
  columns = columns or {}
  image_opts = (columns["image"],) if columns.get("image") else ("jpg", "png", "webp")
  text_opts = (columns["caption"],) if columns.get("caption") else ("caption", "txt")
  url_col = columns.get("url")
  files = _parquet_files(input_path, [image_opts, text_opts], "img2dataset",
                         hint=" (name others with --image-column / --caption-column)",
                         check=lambda path, names: _check_named_columns(path, names, columns))

  def rows():
    for path, names in files:
      image_col, text_col = _first(names, image_opts), _first(names, text_opts)
      drop = {"jpg", "png", "webp", "caption", "txt", "exif", image_col, text_col, url_col}

      def build(rec, row, image_col=image_col, text_col=text_col, drop=drop):
        meta = _scalar_meta(row, drop)
        if url_col:
          meta["url"] = _meta(row[url_col])
        return _pair(rec, row[text_col], row[image_col], meta)
      yield from _each(_parquet_rows(path), build, max_pixels, stats)
  return rows()


def _check_named_columns(path, names, columns):
  """A column named by --caption/image/url-column must exist, and an image column hold bytes
  or {bytes, path} structs: else a one-line UserError."""
  for what, column in columns.items():
    if column not in names:
      raise UserError(f"--{what}-column {column!r} is not a column of {path}: it has "
                      f"{', '.join(names)}")
  image = columns.get("image")
  if image:
    kind = pq.read_schema(path).field(image).type
    if not (_is_binary(kind) or (pa.types.is_struct(kind) and kind.get_field_index("bytes") >= 0
                                 and _is_binary(kind.field("bytes").type))):
      raise UserError(f"--image-column {image!r} of {path} holds {kind}, not image bytes "
                      "(binary, or a {bytes, path} struct as Hugging Face exports write)")


def _is_binary(kind):
  return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _webdataset(input_path, images_dir, max_pixels, stats):
  """WebDataset tars: files `{key}.{ext}` grouped by key (the path up to the
  first dot of the file name); image `jpg|jpeg|png|webp`, caption `txt`, else
  the `caption` of `json`."""
  del images_dir
  files = _files(input_path, ["*.tar"])

  def build(rec, sample):
    key, parts = sample
    meta = {}
    if "json" in parts:
      try:
        info = json.loads(parts["json"])
      except ValueError:
        raise Skip(BAD_JSON, key) from None
      if not isinstance(info, dict):
        raise Skip(BAD_SCHEMA, f"{key}.json is not an object")
      meta = _scalar_meta(info, ("caption",))
    else:
      info = {}
    caption = parts["txt"] if "txt" in parts else info.get("caption")
    image = next((parts[e] for e in IMAGE_EXTENSIONS if e in parts), None)
    if image is None:
      raise Skip(records.MISSING_IMAGE, key)
    meta["key"] = os.path.basename(key)
    return _pair(rec, caption, image, meta)

  def rows():
    for path in files:
      yield from _each(_tar_samples(path), build, max_pixels, stats)
  return rows()


def _tar_samples(path):
  """((key, {ext: bytes}), ()) per sample of a tar, in order of first appearance."""
  try:
    tar = tarfile.open(path)
    members = tar.getmembers()
  except tarfile.TarError as e:
    raise UserError(f"{path} is not a readable tar file ({e})") from None
  with tar:
    groups = {}
    for m in members:
      if not m.isfile():
        continue
      folder, base = os.path.split(m.name)
      stem, dot, ext = base.partition(".")
      if not stem or not dot:
        continue
      groups.setdefault(os.path.join(folder, stem), {})[ext.lower()] = m
    for key, members in groups.items():
      yield (key, {ext: tar.extractfile(m).read() for ext, m in members.items()}), ()


def _tfds(data_dir, name, split, max_pixels, stats):
  """A prepared TFDS dataset (ARRAY_RECORD or PARQUET files), read without
  TensorFlow: one Image feature (kept encoded) and one Text feature, or a
  ClassLabel whose name becomes the caption."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  if not name:
    raise UserError("--format tfds needs --name DATASET (the TFDS dataset name, e.g. my_dataset)")
  if not data_dir or not os.path.isdir(data_dir):
    raise UserError(f"--input {data_dir!r} is not a folder: give the TFDS data_dir")
  try:
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  except Exception as e:  # DatasetNotFoundError and friends
    raise UserError(f"TFDS dataset {name!r} not found in {data_dir!r} "
                    f"({str(e).splitlines()[0]})") from None
  if not builder.is_prepared():
    raise UserError(f"TFDS dataset {name!r} is not prepared in {data_dir!r}: no "
                    f"{builder.data_dir} with dataset_info.json")
  features = builder.info.features
  kinds = {k: type(features[k]).__name__ for k in sorted(features.keys())}
  images = sorted(k for k, f in features.items() if isinstance(f, tfds.features.Image))
  texts = sorted(k for k, f in features.items() if isinstance(f, tfds.features.Text))
  labels = sorted(k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel))
  if len(images) != 1:
    raise UserError(f"TFDS dataset {name!r} needs exactly one Image feature, it has "
                    f"{images or 'none'} (features: {kinds})")
  if len(texts) > 1:
    preferred = [k for k in ("caption", "text", "description") if k in texts]
    if not preferred:
      raise UserError(f"TFDS dataset {name!r} has several Text features {texts}: cannot tell "
                      f"which is the caption (features: {kinds})")
    texts = preferred[:1]
  if not texts and len(labels) != 1:
    raise UserError(f"TFDS dataset {name!r} needs a Text feature or one ClassLabel for the caption "
                    f"(features: {kinds})")
  image_key = images[0]
  try:
    source = builder.as_data_source(split=split,
                                    decoders={image_key: tfds.decode.SkipDecoding()})
  except (ValueError, KeyError) as e:
    raise UserError(f"TFDS dataset {name!r}: {str(e).splitlines()[0]}") from None
  except NotImplementedError as e:
    raise UserError(f"TFDS dataset {name!r} cannot be read without TensorFlow: rebuild it with "
                    f"file_format='array_record' ({e})") from None
  label_key = None if texts else labels[0]

  def build(rec, item):
    index, ex = item
    meta = {"dataset": name, "split": split, "index": index}
    if texts:
      caption = ex[texts[0]]
    else:
      label = int(ex[label_key])
      caption = features[label_key].int2str(label)
      meta["label"] = label
    return _pair(rec, caption, ex[image_key], meta)

  def rows():
    for i in range(len(source)):
      yield (i, source[i]), ()
  return _each(rows(), build, max_pixels, stats)


# ------------------------------------------------------------------- edits


def _edit(rec, source, instruction, target, meta):
  return _doc("edit", [rec.image(source, "condition"), rec.text(instruction, required=True),
                       rec.image(target, "target")], meta)


def _hf_edits(fmt, source, instruction, target):
  """A reader of HF edit parquet whose columns `source`, `instruction`,
  `target` make the edit document; every other scalar column goes to meta."""

  def read(input_path, images_dir, max_pixels, stats):
    del images_dir
    files = _parquet_files(input_path, [source, instruction, target], fmt)

    def build(rec, row):
      return _edit(rec, row[source], row[instruction], row[target],
                   _scalar_meta(row, (instruction,)))

    def rows():
      for path, _ in files:
        yield from _each(_parquet_rows(path), build, max_pixels, stats)
    return rows()
  return read


# timbrooks/instructpix2pix-clip-filtered: original_prompt, original_image,
# edit_prompt, edited_prompt, edited_image.
_instructpix2pix = _hf_edits("instructpix2pix", "original_image", "edit_prompt", "edited_image")
# UCSC-VLAA/HQ-Edit: input, input_image, edit, inverse_edit, output, output_image.
_hq_edit = _hf_edits("hq_edit", "input_image", "edit", "output_image")


# ------------------------------------------------------------- interleaved


def _interleaved(rec, items, stats, sep, meta):
  """[("text", str) | ("image", loader)] -> interleaved document.

  A loader is called to get the image segment; one that raises Skip is dropped
  and counted. Consecutive texts are joined with `sep`; blank ones are left out."""
  segments, texts = [], []
  for kind, value in items:
    if kind == "text":
      if value.strip():
        texts.append(value)
      continue
    try:
      seg = value()
    except Skip as e:
      stats.skip(e.reason)
      continue
    if texts:
      segments.append(rec.text(sep.join(texts)))
      texts = []
    segments.append(seg)
  if texts:
    segments.append(rec.text(sep.join(texts)))
  if not any(seg["kind"] == "image" for seg in segments):
    raise Skip(NO_IMAGES)
  return _doc("interleaved", segments, meta)


def _jsonl_lines(path):
  """Raw lines of a .jsonl file or of the .jsonl members of a .jsonl.zip."""
  if path.endswith(".zip"):
    try:
      zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
      raise UserError(f"{path} is not a readable zip file ({e})") from None
    with zf:
      for member in sorted(zf.namelist()):
        if member.endswith("/"):
          continue
        with zf.open(member) as f:
          yield from f
  else:
    with open(path, "rb") as f:
      yield from f


def _jsonl_rows(paths):
  """(object, repairs) per non-empty line, or Skip("bad_json" | "bad_schema")."""
  for path in paths:
    for line in _jsonl_lines(path):
      if not line.strip():
        continue
      repairs = ()
      try:
        text = line.decode("utf-8")
      except UnicodeDecodeError:
        text, repairs = line.decode("utf-8", errors="replace"), (records.REPAIR_TEXT,)
      try:
        obj = json.loads(text)
      except ValueError:
        yield Skip(BAD_JSON)
        continue
      if not isinstance(obj, dict):
        yield Skip(BAD_SCHEMA, "a line is not a JSON object")
        continue
      yield obj, repairs


def _is_int(v):
  return isinstance(v, int) and not isinstance(v, bool)


def _mmc4(input_path, images_dir, max_pixels, stats):
  """MMC4 jsonl (or the .jsonl.zip shards it ships as): `text_list`, `url`,
  `image_info` [{image_name, raw_url, matched_text_index, matched_sim,
  face_detections}], `similarity_matrix`, `could_have_url_duplicate`. Images
  are files `images_dir/image_name` (default: images/ beside the input)."""
  paths = _files(input_path, ["*.jsonl", "*.jsonl.zip"])
  images_dir = _images_dir(images_dir, _beside(input_path))

  def build(rec, doc):
    _require(doc, "text_list", "image_info")
    sentences, infos = doc["text_list"], doc["image_info"]
    if (not isinstance(sentences, list) or not all(isinstance(s, str) for s in sentences)
        or not isinstance(infos, list)
        or not all(isinstance(i, dict) and isinstance(i.get("image_name"), str)
                   and _is_int(i.get("matched_text_index")) for i in infos)):
      raise Skip(BAD_SCHEMA, "text_list / image_info")
    before = [[] for _ in sentences]
    for info in infos:
      k = info["matched_text_index"]
      if 0 <= k < len(sentences):
        before[k].append(info)
      else:
        stats.skip(BAD_POSITION)
    kept = []

    def loader(info):
      def load():
        seg = rec.image_file(os.path.join(images_dir, info["image_name"]), "condition")
        kept.append(info["image_name"])
        return seg
      return load
    items = []
    for sentence, infos_here in zip(sentences, before):
      items += [("image", loader(info)) for info in infos_here]
      items.append(("text", sentence))
    meta = {"url": _meta(doc.get("url")), "image_names": kept}
    return _interleaved(rec, items, stats, " ", meta)

  return _each(_jsonl_rows(paths), build, max_pixels, stats)


def _obelics(input_path, images_dir, max_pixels, stats):
  """OBELICS parquet: parallel `texts` / `images` lists (exactly one of the two
  set at each position; images are URLs), `metadata` and `general_metadata`
  JSON strings. Image files are `images_dir/sha1(url).{ext}` (default:
  images/ beside the input). Consecutive texts are joined with a blank line."""
  files = _parquet_files(input_path, ["texts", "images"], "obelics")
  images_dir = _images_dir(images_dir, _beside(input_path))
  by_stem = {}
  for entry in sorted(os.scandir(images_dir), key=lambda e: e.name):
    if entry.is_file():
      by_stem.setdefault(os.path.splitext(entry.name)[0], entry.path)

  def build(rec, row):
    texts, urls = row["texts"], row["images"]
    if (not isinstance(texts, list) or not isinstance(urls, list) or len(texts) != len(urls)
        or not all(t is None or isinstance(t, str) for t in texts)
        or not all(u is None or isinstance(u, str) for u in urls)):
      raise Skip(BAD_SCHEMA, "texts / images")
    general = row.get("general_metadata")
    for field in ("metadata", "general_metadata"):
      value = row.get(field)
      if value is not None:
        try:
          parsed = json.loads(value)
        except (TypeError, ValueError):
          raise Skip(BAD_JSON, field) from None
        if field == "general_metadata":
          general = parsed
    kept = []

    def loader(url):
      def load():
        path = by_stem.get(hashlib.sha1(url.encode("utf-8")).hexdigest())
        if path is None:
          raise Skip(records.MISSING_IMAGE, url)
        seg = rec.image_file(path, "condition")
        kept.append(url)
        return seg
      return load
    items = []
    for text, url in zip(texts, urls):
      if (text is None) == (url is None):
        stats.skip(BAD_POSITION)
      elif text is not None:
        items.append(("text", text))
      else:
        items.append(("image", loader(url)))
    meta = {"general_metadata": _meta(general), "image_urls": kept}
    return _interleaved(rec, items, stats, "\n\n", meta)

  def rows():
    for path, names in files:
      columns = [c for c in ("texts", "images", "metadata", "general_metadata") if c in names]
      yield from _each(_parquet_rows(path, columns), build, max_pixels, stats)
  return rows()


# ---------------------------------------------------------- subject-driven


def _omnigen(input_path, images_dir, max_pixels, stats):
  """OmniGen X2I jsonl: `task_type`, `instruction` with `<img><|image_k|></img>`
  placeholders (1-based into `input_images`), `input_images`, `output_image`
  (paths relative to images_dir, default: the jsonl's folder). Every input
  image must be referenced exactly once, else "placeholder_mismatch"."""
  paths = _files(input_path, ["*.jsonl"])
  default = (input_path if os.path.isdir(input_path)
             else os.path.dirname(os.path.abspath(input_path)))
  images_dir = _images_dir(images_dir, default)

  def build(rec, row):
    _require(row, "instruction", "output_image")
    instruction, inputs = row["instruction"], row.get("input_images") or []
    task, output = row.get("task_type") or "subject", row["output_image"]
    if (not isinstance(instruction, (str, type(None))) or not isinstance(inputs, list)
        or not all(isinstance(p, str) for p in inputs) or not isinstance(output, str)
        or not isinstance(task, str)):
      raise Skip(BAD_SCHEMA, "instruction / input_images / output_image / task_type")
    instruction = rec.text(instruction, required=True)["text"]
    pieces = _PLACEHOLDER.split(instruction)  # text, index, text, index, ..., text
    refs = [int(k) for k in pieces[1::2]]
    if len(refs) != len(inputs) or sorted(refs) != list(range(1, len(inputs) + 1)):
      raise Skip(PLACEHOLDER_MISMATCH, f"{refs} for {len(inputs)} input images")
    segments = []
    for i, piece in enumerate(pieces):
      if i % 2:
        segments.append(rec.image_file(os.path.join(images_dir, inputs[int(piece) - 1]),
                                       "condition"))
      elif piece:
        segments.append({"kind": "text", "text": piece, "loss": True})
    segments.append(rec.image_file(os.path.join(images_dir, output), "target"))
    meta = {"instruction": instruction, "input_images": list(inputs), "output_image": output}
    return _doc(task, segments, meta)

  return _each(_jsonl_rows(paths), build, max_pixels, stats)


_READERS = {
    "img2dataset": _img2dataset,
    "webdataset": _webdataset,
    "instructpix2pix": _instructpix2pix,
    "hq_edit": _hq_edit,
    "mmc4": _mmc4,
    "obelics": _obelics,
    "omnigen": _omnigen,
}
