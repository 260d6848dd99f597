"""Small files in exactly the public dataset schemas that `unimm.data.formats` reads.

For tests, benchmarks and demos that need real-format input without a
download. Images are given as encoded bytes (None for a missing one), so a
caller can inject any bad image; `bad_images()` holds one of each kind and
`shapes_pairs()` makes good ones from the built-in Shapes world.

    pairs = shapes_pairs(100)
    write_img2dataset("runs/data/laion/00000.parquet",
                      [{"image": png, "caption": cap} for png, cap in pairs])
    # python -m unimm.data.convert --format img2dataset --input runs/data/laion --output runs/data/pairs

As a command, it writes Shapes-world samples in a public format (what the
mixture demo converts and trains on):

    python -m unimm.data.fixtures --format img2dataset --output runs/data/raw/00000.parquet --n 2000
"""

import hashlib
import io
import json
import os
import struct
import tarfile
import warnings
import zipfile
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from unimm.data import records, shapes

HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


# ------------------------------------------------------------------- images


def _save(img, fmt, **kw):
  buf = io.BytesIO()
  img.save(buf, format=fmt, **kw)
  return buf.getvalue()


def encode_png(array) -> bytes:
  """uint8 [H, W, 3] (or [H, W]) -> PNG bytes."""
  return _save(Image.fromarray(np.asarray(array, np.uint8)), "PNG")


def encode_jpeg(array, quality: int = 95) -> bytes:
  """uint8 [H, W, 3] -> JPEG bytes."""
  return _save(Image.fromarray(np.asarray(array, np.uint8)), "JPEG", quality=quality)


def _noise(h, w, seed):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
  """A tiny PNG whose header claims width x height pixels (default > records.MAX_PIXELS)."""
  png = encode_png(np.zeros((4, 4, 3), np.uint8))
  ihdr = b"IHDR" + struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
  return png[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def bad_images() -> dict:
  """reason -> image bytes, one per bad case `records.check_image` names.

  Skips: empty_image, undecodable_image, truncated_image, decompression_bomb.
  Repairs (kept as RGB PNG): 16bit_image (16-bit grayscale PNG), cmyk_image
  (CMYK JPEG), palette_image (palette PNG), alpha_image (RGBA PNG)."""
  rgb = _noise(16, 16, 1)
  jpeg = encode_jpeg(_noise(32, 32, 2), quality=90)
  gray16 = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
  alpha = np.concatenate([rgb, np.full((16, 16, 1), 128, np.uint8)], axis=-1)
  return {
      records.EMPTY_IMAGE: b"",
      records.UNDECODABLE_IMAGE: b"this is not an image, just some bytes",
      records.TRUNCATED_IMAGE: jpeg[:len(jpeg) * 6 // 10],
      records.DECOMPRESSION_BOMB: bomb_png(),
      records.REPAIR_16BIT: _save(Image.fromarray(gray16), "PNG"),
      records.REPAIR_CMYK: _save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95),
      records.REPAIR_PALETTE: _save(Image.fromarray(rgb).convert("P"), "PNG"),
      records.REPAIR_ALPHA: _save(Image.fromarray(alpha, "RGBA"), "PNG"),
  }


def shapes_pairs(n: int, image_size: int = 32, seed: int = 0) -> list:
  """n (PNG bytes, caption) pairs of random one- or two-object Shapes scenes."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    scene = shapes.random_scene(rng, int(rng.integers(1, 3)))
    out.append((encode_png(shapes.render(scene, image_size)), shapes.caption(scene)))
  return out


def _size(data):
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      return Image.open(io.BytesIO(data)).size
  except Exception:  # bad bytes on purpose
    return None, None


def _ext(data):
  if data and data[:8] == b"\x89PNG\r\n\x1a\n":
    return "png"
  if data and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "webp"
  return "jpg"


def _stem(path):
  return os.path.basename(path).split(".")[0]


def _mkdir_for(path):
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)


def _hf_image(data, path=None):
  return None if data is None else {"bytes": data, "path": path}


def _write_hf_parquet(path, columns, schema):
  """A parquet file as HF `datasets` writes it (Image columns as {bytes, path} structs)."""
  features = {f.name: ({"_type": "Image"} if f.type == HF_IMAGE else
                       {"dtype": "string", "_type": "Value"}) for f in schema}
  schema = schema.with_metadata({"huggingface": json.dumps({"info": {"features": features}})})
  _mkdir_for(path)
  pq.write_table(pa.table(columns, schema=schema), path)


# ------------------------------------------------------------------- pairs


def write_img2dataset(path, rows, image_column: str = "jpg"):
  """A parquet shard as `img2dataset --output_format parquet --caption_col ...` writes it.

  Each row: {"image": bytes | None, "caption": str | None, and optionally "key",
  "url", "status", ...}. Columns, in img2dataset's order: url, caption, key,
  status, error_message, width, height, original_width, original_height, exif,
  sha256, then the image bytes column `image_column` (jpg, png or webp; null
  where the download failed)."""
  cols = {k: [] for k in ("url", "caption", "key", "status", "error_message", "width", "height",
                          "original_width", "original_height", "exif", "sha256", image_column)}
  for i, row in enumerate(rows):
    data = row.get("image")
    ok = data is not None
    w, h = _size(data) if ok else (None, None)
    cols["url"].append(row.get("url", f"https://example.com/{i:09d}.jpg"))
    cols["caption"].append(row.get("caption"))
    cols["key"].append(row.get("key", f"{i:09d}"))
    cols["status"].append(row.get("status", "success" if ok else "failed_to_download"))
    cols["error_message"].append(row.get("error_message", None if ok else "HTTP Error 404"))
    for k, v in (("width", w), ("height", h), ("original_width", w), ("original_height", h)):
      cols[k].append(row.get(k, v))
    cols["exif"].append(row.get("exif", "{}" if ok else None))
    cols["sha256"].append(hashlib.sha256(data).hexdigest() if ok else None)
    cols[image_column].append(data)
  schema = pa.schema([
      ("url", pa.string()), ("caption", pa.string()), ("key", pa.string()),
      ("status", pa.string()), ("error_message", pa.string()), ("width", pa.int32()),
      ("height", pa.int32()), ("original_width", pa.int32()), ("original_height", pa.int32()),
      ("exif", pa.string()), ("sha256", pa.string()), (image_column, pa.binary())])
  _mkdir_for(path)
  pq.write_table(pa.table(cols, schema=schema), path)


def write_webdataset(path, rows):
  """A WebDataset tar shard as img2dataset writes it: {key}.jpg, {key}.txt, {key}.json.

  Each row: {"image": bytes | None (no image file), "ext": image extension
  (default: from the bytes), "caption": str | bytes | None (the .txt; None: no
  .txt), "json": dict | str | bytes | None (the .json; default: img2dataset's
  metadata with the caption; a str/bytes is written as is), "key": default
  9 digits}."""
  _mkdir_for(path)
  with tarfile.open(path, "w") as tar:
    for i, row in enumerate(rows):
      key = row.get("key", f"{i:09d}")
      data, caption = row.get("image"), row.get("caption")
      meta = row.get("json", _default_json(key, i, data, caption))
      files = []
      if data is not None:
        files.append((row.get("ext") or _ext(data), data))
      if caption is not None:
        files.append(("txt", caption.encode("utf-8") if isinstance(caption, str) else caption))
      if meta is not None:
        files.append(("json", meta if isinstance(meta, bytes) else
                      (meta if isinstance(meta, str) else json.dumps(meta, indent=4)).encode()))
      for ext, payload in files:
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(payload)
        info.mtime = 0
        tar.addfile(info, io.BytesIO(payload))


def _default_json(key, i, data, caption):
  w, h = _size(data) if data else (None, None)
  return {"url": f"https://example.com/{i:09d}.jpg",
          "caption": caption if isinstance(caption, str) else None, "key": key,
          "status": "success", "error_message": None, "width": w, "height": h,
          "original_width": w, "original_height": h}


def write_tfds(data_dir, name, rows, label_names=None, split="train"):
  """A prepared TFDS dataset `name` (version 1.0.0, ARRAY_RECORD files) in data_dir.

  Features come from the keys of the rows: keys starting with "image" are
  `tfds.features.Image` (given as encoded bytes, stored as they are: TFDS
  cannot encode arrays without TensorFlow), "label" a `ClassLabel` over
  `label_names`, any other key `Text` (str or bytes). Examples keep row order
  (disable_shuffling). Returns the dataset's folder."""
  import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel

  rows = list(rows)
  keys = list(rows[0]) if rows else ["image", "caption"]
  feats = {}
  for k in keys:
    if k.startswith("image"):
      feats[k] = tfds.features.Image(shape=(None, None, 3))
    elif k == "label":
      feats[k] = tfds.features.ClassLabel(names=list(label_names))
    else:
      feats[k] = tfds.features.Text()

  class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    # No code folder: TFDS would look for checksums beside this module through
    # importlib_resources, which is not installed.
    code_path = None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(feats),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples()}

    def _generate_examples(self):
      for i, row in enumerate(rows):
        yield i, row

  _Builder.name = name
  builder = _Builder(data_dir=data_dir, file_format="array_record")
  builder.download_and_prepare()
  return builder.data_dir


# ------------------------------------------------------------------- edits


def _write_hf_rows(path, rows, schema):
  """Rows (dicts; images as bytes | None) -> an HF-style parquet of `schema`."""
  cols = {f.name: [] for f in schema}
  for row in rows:
    for f in schema:
      v = row.get(f.name)
      cols[f.name].append(_hf_image(v) if f.type == HF_IMAGE else v)
  _write_hf_parquet(path, cols, schema)


def write_instructpix2pix(path, rows):
  """A parquet shard of timbrooks/instructpix2pix-clip-filtered.

  Each row: {"original_image", "edited_image": bytes | None, "edit_prompt",
  "original_prompt", "edited_prompt": str | None}."""
  schema = pa.schema([("original_prompt", pa.string()), ("original_image", HF_IMAGE),
                      ("edit_prompt", pa.string()), ("edited_prompt", pa.string()),
                      ("edited_image", HF_IMAGE)])
  _write_hf_rows(path, rows, schema)


def write_hq_edit(path, rows):
  """A parquet shard of UCSC-VLAA/HQ-Edit.

  Each row: {"input_image", "output_image": bytes | None, "input", "edit",
  "inverse_edit", "output": str | None}."""
  schema = pa.schema([("input", pa.string()), ("input_image", HF_IMAGE), ("edit", pa.string()),
                      ("inverse_edit", pa.string()), ("output", pa.string()),
                      ("output_image", HF_IMAGE)])
  _write_hf_rows(path, rows, schema)


# ------------------------------------------------------------- interleaved


def _write_lines(path, lines):
  """JSON lines to path; a .zip path holds one .jsonl member, as MMC4 ships its shards."""
  data = b"".join((l if isinstance(l, bytes) else l.encode("utf-8")) + b"\n" for l in lines)
  _mkdir_for(path)
  if path.endswith(".zip"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
      zf.writestr(os.path.basename(path)[:-len(".zip")], data)
  else:
    with open(path, "wb") as f:
      f.write(data)


def write_mmc4(path, images_dir, docs):
  """An MMC4 shard (.jsonl, or .jsonl.zip) and its image files.

  Each doc: {"text_list": [str], "images": [{"bytes": bytes | None (no file),
  "matched_text_index": int, "image_name": optional}], "url": optional}, or a
  str / bytes written as the raw line. Image files go to
  images_dir/image_name."""
  os.makedirs(images_dir, exist_ok=True)
  lines = []
  for d, doc in enumerate(docs):
    if isinstance(doc, (str, bytes)):
      lines.append(doc)
      continue
    infos = []
    for k, im in enumerate(doc.get("images", [])):
      data = im.get("bytes")
      name = im.get("image_name") or f"{_stem(path)}_{d}_{k}.{_ext(data)}"
      if data is not None:
        with open(os.path.join(images_dir, name), "wb") as f:
          f.write(data)
      infos.append({"image_name": name, "raw_url": f"https://example.com/{name}",
                    "matched_text_index": im["matched_text_index"],
                    "matched_sim": float(im.get("matched_sim", 0.3)), "face_detections": None})
    text_list = doc["text_list"]
    n_text = len(text_list) if isinstance(text_list, list) else 0
    lines.append(json.dumps({
        "text_list": text_list, "url": doc.get("url", f"https://example.com/doc{d}"),
        "image_info": infos,
        "similarity_matrix": [[0.2] * n_text for _ in infos],
        "could_have_url_duplicate": 0}))
  _write_lines(path, lines)


def obelics_image_name(url: str, ext: str = "jpg") -> str:
  """The file name of an OBELICS image: sha1 of its URL, plus an extension."""
  return f"{hashlib.sha1(url.encode('utf-8')).hexdigest()}.{ext}"


def write_obelics(path, images_dir, docs):
  """An OBELICS parquet shard and its image files.

  Each doc is a list of positions, or {"positions": [...], "general_metadata":
  raw JSON str}. A position is {"text": str} or {"image": bytes | None (no
  file), "url": optional}; one with both "text" and an image/url, or neither,
  is written as it is (a malformed position). Images go to
  images_dir/sha1(url).ext."""
  os.makedirs(images_dir, exist_ok=True)
  cols = {"images": [], "metadata": [], "general_metadata": [], "texts": []}
  for d, doc in enumerate(docs):
    positions, general = doc, None
    if isinstance(doc, dict):
      positions, general = doc["positions"], doc.get("general_metadata")
    doc_url = f"https://example.com/doc{d}"
    images, texts, meta = [], [], []
    for k, pos in enumerate(positions):
      url = pos.get("url")
      if url is None and "image" in pos:
        url = f"https://example.com/doc{d}/img{k}.jpg"
      data = pos.get("image")
      if data is not None:
        with open(os.path.join(images_dir, obelics_image_name(url, _ext(data))), "wb") as f:
          f.write(data)
      images.append(url)
      texts.append(pos.get("text"))
      meta.append(None if url is None else {
          "document_url": doc_url, "unformatted_src": url, "src": url,
          "formatted_filename": os.path.basename(url), "alt_text": "",
          "rendered_width": 16, "rendered_height": 16})
    cols["images"].append(images)
    cols["texts"].append(texts)
    cols["metadata"].append(json.dumps(meta))
    cols["general_metadata"].append(general if general is not None else json.dumps({
        "url": doc_url, "warc_filename": "crawl-data/CC-MAIN-2023-06/example.warc.gz",
        "warc_record_offset": 1000 * d, "warc_record_length": 500}))
  schema = pa.schema([("images", pa.list_(pa.string())), ("metadata", pa.string()),
                      ("general_metadata", pa.string()), ("texts", pa.list_(pa.string()))])
  _mkdir_for(path)
  pq.write_table(pa.table(cols, schema=schema), path)


# ---------------------------------------------------------- subject-driven


def write_omnigen(path, images_dir, rows):
  """An OmniGen X2I jsonl and its image files.

  Each row: {"task_type": str, "instruction": str with <img><|image_k|></img>,
  "input_images": [bytes | None | str], "output_image": bytes | None | str},
  or a str / bytes written as the raw line. Bytes are written to files (None:
  a path whose file is absent); a str is used as the path. Paths are relative
  to images_dir."""
  os.makedirs(images_dir, exist_ok=True)
  stem = _stem(path)

  def file(data, name):
    if isinstance(data, str):
      return data
    name = f"{name}.{_ext(data)}"
    if data is not None:
      with open(os.path.join(images_dir, name), "wb") as f:
        f.write(data)
    return name

  lines = []
  for r, row in enumerate(rows):
    if isinstance(row, (str, bytes)):
      lines.append(row)
      continue
    out = dict(row)
    if "input_images" in row:
      out["input_images"] = [file(x, f"{stem}_{r}_in{k}")
                             for k, x in enumerate(row["input_images"])]
    if "output_image" in row:
      out["output_image"] = file(row["output_image"], f"{stem}_{r}_out")
    lines.append(json.dumps(out))
  _write_lines(path, lines)


# ------------------------------------------------------------------ command


def shapes_edits(n: int, image_size: int = 32, seed: int = 0) -> list:
  """n InstructPix2Pix rows (source PNG, instruction, edited PNG) of Shapes scenes."""
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(n):
    scene = shapes.random_scene(rng, int(rng.integers(1, 3)))
    instruction, target = shapes.random_edit(rng, scene)
    rows.append({"original_image": encode_png(shapes.render(scene, image_size)),
                 "edit_prompt": instruction,
                 "edited_image": encode_png(shapes.render(target, image_size)),
                 "original_prompt": shapes.caption(scene), "edited_prompt": shapes.caption(target)})
  return rows


def main(argv) -> str:
  """Writes --n Shapes samples as --format (img2dataset, webdataset or
  instructpix2pix) to --output; returns the path."""
  import argparse  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(prog="python -m unimm.data.fixtures", description=main.__doc__)
  p.add_argument("--format", required=True, choices=("img2dataset", "webdataset", "instructpix2pix"))
  p.add_argument("--output", required=True, help="the file to write (.parquet / .tar)")
  p.add_argument("--n", type=int, default=1000)
  p.add_argument("--image-size", type=int, default=64)
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  if args.format == "instructpix2pix":
    write_instructpix2pix(args.output, shapes_edits(args.n, args.image_size, args.seed))
  else:
    rows = [{"image": png, "caption": cap}
            for png, cap in shapes_pairs(args.n, args.image_size, args.seed)]
    globals()[f"write_{args.format}"](args.output, rows)
  print(args.output)
  return args.output


if __name__ == "__main__":
  from unimm.errors import cli  # pylint: disable=import-outside-toplevel
  cli(main)
