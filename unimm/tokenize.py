"""Runs a trained image tokenizer over images: reconstructions with PSNR / SSIM, latents, a latent cache.

    python -m unimm.tokenize reconstruct --tokenizer WORKDIR --input SRC --output OUT \\
        [--image-size S | native] [--limit N] [--batch-size 16] [--seed N]
    python -m unimm.tokenize encode --tokenizer WORKDIR --input SRC --output OUT \\
        [--image-size S | native] [--limit N] [--keep-images] [--docs-per-shard 10000]
    python -m unimm.tokenize decode --tokenizer WORKDIR --input DIR_OF_NPY --output OUT

WORKDIR is what `python -m unimm.train.autoencoder` trained (KL-VAE or VQ / FSQ /
LFQ). SRC is one of

    a folder of image files   png jpg jpeg webp bmp tif tiff, recursive, sorted; other
                              files are ignored and counted (`ignored_files`)
    one image file
    a converted data folder   info.json + docs-*.array_record (`unimm.data.convert`):
                              every image segment
    shapes                    N held-out Shapes images (--limit, default 64) drawn from the
                              tokenizer's eval seed, as its eval.json was (a folder named
                              shapes: write ./shapes)
    skimage                   the photographs scikit-image ships in skimage/data
                              (`SKIMAGE_PHOTOS`; no network)

Each image is checked with `records.check_image` (empty, garbage, truncated and
oversized images are skipped and counted by reason; 16-bit, CMYK, palette, alpha
and grayscale ones are converted to RGB and counted as repaired) and decoded
with `records.decode_image` to S x S (default: the tokenizer's training
image_size; other sizes are resized to cover S x S and centre-cropped, counted
as `resized` and, where the aspect ratio differed, `cropped`). With
`--image-size native` images keep their size, centre-cropped to a multiple of
the downsampling factor f (counted as `cropped`); images whose latent grid has
more than --max-tokens positions (the mid-block attention is quadratic in them)
are skipped as `too_many_tokens`.

reconstruct writes OUT/<name>.png and OUT/report.json: per-image PSNR (dB, uint8,
capped at 100 for identical images) and SSIM (scikit-image), their means, counts,
and for vq the codebook usage and perplexity over all tokens. encode writes
OUT/<name>.npy (float32 [h, w, c] normalised latents, or int32 [h, w] codes) and
OUT/report.json; from a converted folder it writes the latent cache instead: a
converted folder of the same record schema whose image segments hold

    {"kind": "image", "role": ..., "latent": {"dtype": "float16" | "int32",
                                              "shape": [h, w, c] | [h, w],
                                              "data": raw little-endian bytes, C order}}

("bytes" too with --keep-images), read back with `read_latent(segment)`;
OUT/info.json is the input's info.json with `documents`, `images`, `shards`
of the cache, plus "tokenizer" {workdir, kind, step, factor, image_size,
num_codes, channels} and "latent_cache" {input, image_size, keep_images, and
this run's skipped / repaired / resized / cropped counts}. A bad image drops its
document (counted by the image's reason), except in interleaved documents,
where only that image is dropped (and the document, counted `no_images`, when
none is left): as `unimm.data.convert` does. decode turns OUT/<name>.npy files
back into PNGs.

The last stdout line is a JSON summary (report.json without the per-image
lists); progress goes to stderr. Bad arguments, an --input image file that is not
a usable image (a folder's bad images are skipped and counted), a converted folder
with a missing or damaged info.json or shard, or a tokenizer workdir that is not
one, or whose checkpoint does not match its config: one `error: ...` line and exit
status 2, before the tokenizer is restored where the input is at fault.
"""

import argparse
import io
import json
import math
import os
import sys

import numpy as np
from PIL import Image
from tqdm import tqdm

from unimm.data import records
from unimm.errors import UserError, cli

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")
# The photographs among scikit-image's bundled data (no download needed); the rest
# (chessboards, logo, text, page, phantom, horse) are drawings or synthetic.
SKIMAGE_PHOTOS = ("astronaut", "brick", "camera", "cell", "chelsea", "clock_motion", "coffee",
                  "coins", "grass", "gravel", "hubble_deep_field", "ihc", "microaneurysms",
                  "moon", "motorcycle_left", "motorcycle_right", "retina", "rocket")
TOO_MANY_TOKENS = "too_many_tokens"
BAD_LATENT = records.BAD_LATENT
NO_IMAGES = "no_images"
PSNR_CAP = 100.0
ATTENTION_BUDGET = 1 << 15  # latent positions per batch at full size (see main)


# -------------------------------------------------------------- latent cache


latent_field, read_latent = records.latent_field, records.read_latent


# ------------------------------------------------------------------- inputs


def _is_converted(path):
  """A folder written by unimm.data.convert (docs-*.array_record shards; `records.shard_paths`
  checks its info.json)?"""
  return os.path.isdir(path) and any(n.startswith("docs-") and n.endswith(".array_record")
                                     for n in os.listdir(path))


def _ext(path):
  return os.path.splitext(path)[1][1:].lower()


def _read(path):
  with open(path, "rb") as f:
    return f.read()


def folder_items(path, counts):
  """(name, loader) of each image file under `path` (recursive, sorted); other files
  are counted in counts["ignored_files"]. name: the relative path without extension."""
  files = []
  for root, dirs, names in os.walk(path):
    dirs.sort()
    files.extend(os.path.join(root, n) for n in names)
  files = sorted(os.path.relpath(f, path) for f in files)
  used = set()
  for rel in files:
    if _ext(rel) not in IMAGE_EXTENSIONS:
      counts["ignored_files"] += 1
      continue
    name = os.path.splitext(rel)[0]
    if name in used:  # a.png beside a.jpg
      name = rel
    used.add(name)
    yield name, (lambda p=os.path.join(path, rel): _read(p))


def shapes_items(n, size, seed, two_object_prob):
  """n held-out Shapes scenes at size x size as PNG bytes (rng (1, seed): the
  autoencoder trainer's eval set)."""
  from unimm.data.fixtures import encode_png  # pylint: disable=import-outside-toplevel
  from unimm.train.autoencoder import shapes_images  # pylint: disable=import-outside-toplevel
  images = shapes_images(np.random.default_rng((1, int(seed))), n, size, two_object_prob)
  for i, img in enumerate(images):
    yield f"shapes-{i:05d}", (lambda a=img: encode_png(a))


def skimage_dir():
  try:
    import skimage  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("--input skimage needs scikit-image: pip install scikit-image") from None
  return os.path.join(os.path.dirname(skimage.__file__), "data")


def skimage_items():
  """The photographs bundled with scikit-image (a missing one is skipped as missing_image)."""
  folder = skimage_dir()
  have = {os.path.splitext(n)[0]: n for n in sorted(os.listdir(folder))
          if _ext(n) in IMAGE_EXTENSIONS}
  for name in SKIMAGE_PHOTOS:
    path = os.path.join(folder, have.get(name, name + ".png"))
    yield name, (lambda p=path: _read(p) if os.path.exists(p) else None)


def _records(path):
  """(shard name, index, record bytes) of every record of a converted folder."""
  for shard in records.shard_paths(path):
    reader = records.open_shard(shard)
    try:
      n = reader.num_records()
      for start in range(0, n, 256):
        for i, rec in enumerate(reader.read(start, min(start + 256, n))):
          yield os.path.basename(shard).split(".")[0], start + i, rec
    finally:
      reader.close()


def converted_items(path, stats):
  """(name, loader) of every image segment of a converted folder; name
  docs-SSSSS-RRRRRR-KK (shard, record, segment). Malformed records are counted."""
  for shard, i, rec in _records(path):
    try:
      doc = records.unpack(rec)
    except records.Skip as e:
      stats.skip(e.reason)
      continue
    for k, seg in enumerate(doc["segments"]):
      if seg["kind"] == "image":
        yield f"{shard}-{i:06d}-{k:02d}", (lambda b=seg["bytes"]: b)


def open_input(spec, args, ae, stats, counts):
  """(kind, iterator of (name, loader), total or None) of an --input."""
  if spec == "shapes":
    cfg = json.load(open(os.path.join(ae.workdir, "config.json")))
    n = args.limit if args.limit is not None else 64
    size = args.size if args.size else ae.image_size
    prob = float(cfg.get("data", {}).get("two_object_prob", 0.5))
    return "shapes", shapes_items(n, size, args.seed if args.seed is not None
                                  else ae.t.eval_seed, prob), n
  if spec == "skimage":
    return "skimage", skimage_items(), len(SKIMAGE_PHOTOS)
  if os.path.isfile(spec):  # (check_input checked it)
    return "file", iter([(os.path.splitext(os.path.basename(spec))[0],
                          lambda: _read(spec))]), 1
  if _is_converted(spec):
    return "converted", converted_items(spec, stats), None
  return "folder", folder_items(spec, counts), None


def check_input(args):
  """Fails fast, before the tokenizer is restored, on an --input that cannot be read: one
  image file that is not a usable image (a one-line error naming it: a folder's bad images
  are skipped and counted instead), a converted folder with a missing or damaged info.json
  or shard."""
  spec = args.input
  if args.command == "decode" or spec in ("shapes", "skimage"):
    return
  if os.path.isfile(spec):
    if _ext(spec) not in IMAGE_EXTENSIONS:
      raise UserError(f"--input {spec} is not an image file ({', '.join(IMAGE_EXTENSIONS)}): give "
                      "an image, a folder of images, a converted data folder, shapes or skimage")
    records.image_file(spec, "--input")
  elif not os.path.isdir(spec):
    raise UserError(f"--input {spec!r} does not exist: give an image file, a folder of images, a "
                    "converted data folder, shapes or skimage")
  elif _is_converted(spec):
    for shard in records.shard_paths(spec):
      records.open_shard(shard).close()


def _limited(items, limit):
  for i, item in enumerate(items):
    if limit is not None and i >= limit:
      return
    yield item


# ----------------------------------------------------------------- images


def prepare(data, size, factor, max_tokens, stats, counts):
  """Encoded bytes -> (uint8 [S, S, 3] (or native size cropped to a multiple of
  factor), original (h, w), repair reason, checked bytes). Raises records.Skip (not counted here);
  counts repairs, resizes and crops."""
  fixed, repair = records.check_image(data)
  img = Image.open(io.BytesIO(fixed))
  w, h = img.size
  if repair is None and img.mode != "RGB":
    repair = records.REPAIR_GRAY  # check_image keeps 8-bit gray as is; it becomes RGB here
  if size:
    array = records.decode_image(fixed, size=(size, size))
    changed = (h, w) != (size, size)
    # decode_image keeps EXIF-turned sizes; a square target makes the turn irrelevant here
    cropped = h != w
  else:
    array = records.decode_image(fixed)
    hh, ww = array.shape[0] // factor * factor, array.shape[1] // factor * factor
    if hh == 0 or ww == 0:
      raise records.Skip(records.UNDECODABLE_IMAGE, f"{array.shape[1]}x{array.shape[0]} is "
                         f"smaller than the downsampling factor {factor}")
    if (hh // factor) * (ww // factor) > max_tokens:
      raise records.Skip(TOO_MANY_TOKENS, f"{ww}x{hh} gives {(hh // factor) * (ww // factor)} "
                         f"latent positions > --max-tokens {max_tokens}")
    top, left = (array.shape[0] - hh) // 2, (array.shape[1] - ww) // 2
    changed = cropped = (hh, ww) != array.shape[:2]
    array = array[top:top + hh, left:left + ww]
  stats.repair(repair)
  counts["resized"] += bool(changed and size)
  counts["cropped"] += bool(cropped and changed)
  return array, (h, w), repair, fixed


def _prepared(items, args, ae, stats, counts, skipped_list):
  """(name, image, original size, repair) of each usable item; skips are counted."""
  for name, load in items:
    try:
      data = load()
      image, hw, repair, _ = prepare(data, args.size, ae.factor, args.max_tokens, stats, counts)
    except records.Skip as e:
      stats.skip(e.reason)
      skipped_list.append({"name": name, "reason": e.reason, "detail": e.detail})
      continue
    yield name, image, hw, repair


def _batched(items, batch_size, shape_of):
  """Consecutive items in lists of at most batch_size that share shape_of(item)."""
  buf = []
  for item in items:
    if buf and (len(buf) == batch_size or shape_of(buf[0]) != shape_of(item)):
      yield buf
      buf = []
    buf.append(item)
  if buf:
    yield buf


def _padded(fn, arrays, batch_size):
  """fn over a stack of same-shape arrays, zero-padded to batch_size so that every
  batch has one shape (one compilation); the padding's results are dropped."""
  x = np.stack(arrays)
  n = len(x)
  if n < batch_size:
    x = np.concatenate([x, np.zeros((batch_size - n,) + x.shape[1:], x.dtype)])
  return np.asarray(fn(x))[:n]


def _metrics():
  try:
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("reconstruct needs scikit-image for PSNR / SSIM: pip install scikit-image") from None

  def psnr(a, b):
    if np.array_equal(a, b):
      return PSNR_CAP
    return float(min(peak_signal_noise_ratio(a, b, data_range=255), PSNR_CAP))

  def ssim(a, b):
    win = min(7, min(a.shape[:2]))
    win -= 1 - win % 2  # odd
    if win < 3:
      return float(np.array_equal(a, b))
    return float(structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=win))

  return psnr, ssim


def _save_png(path, array):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  Image.fromarray(np.asarray(array, np.uint8)).save(path)


def _save_npy(path, array):
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  np.save(path, array)


def tokenizer_info(ae) -> dict:
  return {"workdir": ae.workdir, "kind": ae.kind, "step": int(ae.step), "factor": int(ae.factor),
          "image_size": int(ae.image_size), "num_codes": int(ae.num_codes),
          "channels": int(ae.channels)}


def code_stats(counts, num_codes) -> dict:
  """Codebook usage (distinct codes used / num_codes) and perplexity of a bincount."""
  total = counts.sum()
  if not total:
    return {"tokens": 0, "codes_used": 0, "num_codes": int(num_codes), "usage": 0.0,
            "perplexity": 0.0}
  p = counts[counts > 0] / total
  return {"tokens": int(total), "codes_used": int(len(p)), "num_codes": int(num_codes),
          "usage": float(len(p) / num_codes), "perplexity": float(np.exp(-np.sum(p * np.log(p))))}


# ---------------------------------------------------------------- commands


def _bar(items, total, desc, unit=" images"):
  return tqdm(items, total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)


def _finish(out, report, lists):
  """Writes OUT/report.json (with the per-item lists), prints and returns the summary."""
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, "report.json"), "w") as f:
    json.dump(dict(report, **lists), f, indent=1)
  print(json.dumps(report), flush=True)
  return report


def _counts(stats, counts, images):
  return {"images": images, "skipped": dict(sorted(stats.skipped.items())),
          "repaired": dict(sorted(stats.repaired.items())), "resized": counts["resized"],
          "cropped": counts["cropped"], "ignored_files": counts["ignored_files"]}


def _new_counts():
  return {"resized": 0, "cropped": 0, "ignored_files": 0}


def reconstruct(ae, args):
  """Encode + decode each input image; OUT/<name>.png and report.json with PSNR / SSIM."""
  psnr, ssim = _metrics()
  stats, counts, skipped = records.Stats(), _new_counts(), []
  kind, items, total = open_input(args.input, args, ae, stats, counts)
  items = _bar(_limited(items, args.limit), total if args.limit is None else
               min(total or args.limit, args.limit), "reconstruct")
  per_image, code_counts, sq_err, pixels = [], np.zeros(max(ae.num_codes, 1), np.int64), 0.0, 0
  prepared = _prepared(items, args, ae, stats, counts, skipped)
  for batch in _batched(prepared, args.batch_size, lambda p: p[1].shape):
    images = [p[1] for p in batch]
    z = _padded(ae.encode, images, args.batch_size)
    recs = _padded(ae.decode, list(z), args.batch_size)
    if ae.kind == "vq":
      code_counts += np.bincount(z.reshape(-1), minlength=len(code_counts))[:len(code_counts)]
    for (name, image, hw, repair), rec in zip(batch, recs):
      _save_png(os.path.join(args.output, name + ".png"), rec)
      err = rec.astype(np.float64) - image.astype(np.float64)
      sq_err, pixels = sq_err + float(np.sum(err ** 2)), pixels + err.size
      row = {"name": name, "psnr": psnr(image, rec), "ssim": ssim(image, rec),
             "size": [int(hw[0]), int(hw[1])]}
      if repair:
        row["repaired"] = repair
      per_image.append(row)
  n = len(per_image)
  report = {"command": "reconstruct", "input": args.input, "input_kind": kind,
            "image_size": args.size or "native",
            "psnr": float(np.mean([r["psnr"] for r in per_image])) if n else None,
            "ssim": float(np.mean([r["ssim"] for r in per_image])) if n else None,
            "psnr_pooled": (float(min(PSNR_CAP, 10 * math.log10(255.0 ** 2 / (sq_err / pixels))))
                            if pixels and sq_err else (PSNR_CAP if pixels else None)),
            **_counts(stats, counts, n), "tokenizer": tokenizer_info(ae)}
  if ae.kind == "vq":
    report.update(code_stats(code_counts, ae.num_codes))
  if not n:
    print(f"warning: no usable images in {args.input} (skipped: {report['skipped']})",
          file=sys.stderr)
  return _finish(args.output, report, {"per_image": per_image, "skipped_images": skipped})


def encode(ae, args):
  """Latents / codes of each input image: OUT/<name>.npy, or the latent cache of a
  converted folder."""
  if args.input not in ("shapes", "skimage") and _is_converted(args.input):
    return encode_converted(ae, args)
  stats, counts, skipped = records.Stats(), _new_counts(), []
  kind, items, total = open_input(args.input, args, ae, stats, counts)
  items = _bar(_limited(items, args.limit), total if args.limit is None else
               min(total or args.limit, args.limit), "encode")
  rows, code_counts = [], np.zeros(max(ae.num_codes, 1), np.int64)
  for batch in _batched(_prepared(items, args, ae, stats, counts, skipped), args.batch_size,
                        lambda p: p[1].shape):
    z = _padded(ae.encode, [p[1] for p in batch], args.batch_size)
    if ae.kind == "vq":
      code_counts += np.bincount(z.reshape(-1), minlength=len(code_counts))[:len(code_counts)]
    for (name, _, hw, repair), lat in zip(batch, z):
      _save_npy(os.path.join(args.output, name + ".npy"), lat)
      row = {"name": name, "shape": list(lat.shape), "size": [int(hw[0]), int(hw[1])]}
      if repair:
        row["repaired"] = repair
      rows.append(row)
  report = {"command": "encode", "input": args.input, "input_kind": kind,
            "image_size": args.size or "native",
            "dtype": "int32" if ae.kind == "vq" else "float32",
            **_counts(stats, counts, len(rows)), "tokenizer": tokenizer_info(ae)}
  if ae.kind == "vq":
    report.update(code_stats(code_counts, ae.num_codes))
  return _finish(args.output, report, {"per_image": rows, "skipped_images": skipped})


def encode_converted(ae, args):
  """The latent cache of a converted folder (see the module docstring)."""
  src = args.input
  info = records.read_info(src)
  if "tokenizer" in info:
    raise UserError(f"--input {src} is already a latent cache (its info.json names a tokenizer): "
                    "give the converted folder it was made from")
  if not args.size:
    raise UserError("a latent cache needs one --image-size S (not native): every latent of the "
                    "cache has the same shape")
  writer = records.ShardWriter(args.output, args.docs_per_shard)
  stats, counts = records.Stats(), _new_counts()
  pending, n_images = [], 0  # documents whose images wait for a batch
  code_counts = np.zeros(max(ae.num_codes, 1), np.int64)

  def flush():
    nonlocal pending, n_images
    slots = [seg for doc in pending for seg in doc["segments"] if "_image" in seg]
    for i in range(0, len(slots), args.batch_size):
      chunk = slots[i:i + args.batch_size]
      z = _padded(ae.encode, [s.pop("_image") for s in chunk], args.batch_size)
      if ae.kind == "vq":
        code_counts[:] += np.bincount(z.reshape(-1), minlength=len(code_counts))[:len(code_counts)]
      for seg, lat in zip(chunk, z):
        seg["latent"] = latent_field(lat)
    for doc in pending:
      writer.write(doc)
      stats.documents += 1
      stats.images += sum(s["kind"] == "image" for s in doc["segments"])
    pending, n_images = [], 0

  records_iter = _limited(_records(src), args.limit)
  for shard, i, rec in _bar(records_iter, info.get("documents"), "latent cache", " docs"):
    try:
      doc = records.unpack(rec)
      doc = _latent_doc(doc, args, ae, stats, counts, f"{shard}/{i}")
    except records.Skip as e:
      stats.skip(e.reason)
      continue
    pending.append(doc)
    n_images += sum("_image" in s for s in doc["segments"])
    if n_images >= args.batch_size:
      flush()
  flush()
  cache = {"input": os.path.abspath(src), "image_size": args.size,
           "keep_images": bool(args.keep_images), **_counts(stats, counts, stats.images)}
  del cache["ignored_files"]
  out_info = dict(info, documents=stats.documents, images=stats.images,
                  tokenizer=tokenizer_info(ae), latent_cache=cache)
  writer.close(out_info)
  report = {"command": "encode", "input": src, "input_kind": "converted",
            "image_size": args.size, "documents": stats.documents,
            **_counts(stats, counts, stats.images), "shards": writer.shards,
            "tokenizer": tokenizer_info(ae)}
  del report["ignored_files"]
  if ae.kind == "vq":
    report.update(code_stats(code_counts, ae.num_codes))
  if not stats.documents:
    print(f"warning: no documents written from {src} (skipped: {report['skipped']})",
          file=sys.stderr)
  print(json.dumps(report), flush=True)
  return report


def _latent_doc(doc, args, ae, stats, counts, where):
  """A document whose usable image segments hold "_image" (to encode); bad images
  drop the document, or in interleaved documents just themselves (counted). Repairs
  and resizes are counted only for documents that are kept."""
  segments, mine, my_counts = [], records.Stats(), _new_counts()
  for seg in doc["segments"]:
    if seg["kind"] != "image":
      segments.append(seg)
      continue
    try:
      image, _, _, fixed = prepare(seg["bytes"], args.size, ae.factor, args.max_tokens, mine,
                                   my_counts)
    except records.Skip as e:
      if doc.get("task") != "interleaved":
        raise
      stats.skip(e.reason)
      continue
    out = {"kind": "image", "role": seg.get("role", "condition"), "_image": image}
    if args.keep_images:
      out["bytes"] = fixed
    segments.append(out)
  if doc.get("task") == "interleaved" and not any(s["kind"] == "image" for s in segments):
    raise records.Skip(NO_IMAGES, where)
  stats.repaired.update(mine.repaired)
  for k, v in my_counts.items():
    counts[k] += v
  return dict(doc, segments=segments)


def decode(ae, args):
  """OUT/<name>.png of each <name>.npy (latents [h, w, c] or codes [h, w]) under --input."""
  src = args.input
  if os.path.isfile(src) and src.endswith(".npy"):
    files, src = [os.path.basename(src)], os.path.dirname(src) or "."
  elif os.path.isdir(src):
    files = []
    for root, dirs, names in os.walk(src):
      dirs.sort()
      files.extend(os.path.relpath(os.path.join(root, n), src) for n in names)
    files.sort()
  else:
    raise UserError(f"--input {src!r} does not exist: give a folder of .npy files written by "
                    "`python -m unimm.tokenize encode`")
  stats, counts, skipped = records.Stats(), _new_counts(), []

  def loaded():
    for rel in _bar(_limited(files, args.limit), None, "decode"):
      if not rel.endswith(".npy"):
        counts["ignored_files"] += 1
        continue
      name = rel[:-len(".npy")]
      try:
        yield name, _check_latent(np.load(os.path.join(src, rel), allow_pickle=False), ae)
      except records.Skip as e:
        stats.skip(e.reason)
        skipped.append({"name": name, "reason": e.reason, "detail": e.detail})
      except Exception as e:  # not an .npy file numpy can read
        stats.skip(BAD_LATENT)
        skipped.append({"name": name, "reason": BAD_LATENT, "detail": f"{type(e).__name__}: {e}"})

  rows = []
  for batch in _batched(loaded(), args.batch_size, lambda p: (p[1].shape, p[1].dtype)):
    recs = _padded(ae.decode, [p[1] for p in batch], args.batch_size)
    for (name, lat), rec in zip(batch, recs):
      _save_png(os.path.join(args.output, name + ".png"), rec)
      rows.append({"name": name, "shape": list(lat.shape)})
  report = {"command": "decode", "input": args.input, "images": len(rows),
            "skipped": dict(sorted(stats.skipped.items())),
            "ignored_files": counts["ignored_files"], "tokenizer": tokenizer_info(ae)}
  return _finish(args.output, report, {"per_image": rows, "skipped_images": skipped})


def _check_latent(z, ae):
  """A loaded latent as the tokenizer's decode takes it, or Skip(bad_latent)."""
  if ae.kind == "vae":
    if z.ndim != 3 or z.shape[-1] != ae.channels or not np.issubdtype(z.dtype, np.floating):
      raise records.Skip(BAD_LATENT, f"{z.dtype} {z.shape}: this vae decodes float "
                         f"[h, w, {ae.channels}] latents")
    return z.astype(np.float32)
  if z.ndim != 2 or not np.issubdtype(z.dtype, np.integer):
    raise records.Skip(BAD_LATENT, f"{z.dtype} {z.shape}: this vq decodes int [h, w] codes")
  if z.size and (z.min() < 0 or z.max() >= ae.num_codes):
    raise records.Skip(BAD_LATENT, f"codes outside [0, {ae.num_codes})")
  return z.astype(np.int32)


# --------------------------------------------------------------------- CLI

_LOADED = {}  # (workdir, what its files look like) -> TrainedAutoencoder, compiled functions kept


def _load(workdir):
  """load_autoencoder(workdir), reused while its config, eval and checkpoints are unchanged
  (a process that runs several commands restores and compiles once)."""
  from unimm.models.autoencoder import load_autoencoder  # pylint: disable=import-outside-toplevel
  workdir = os.path.abspath(workdir)
  stamp = []
  for name in ("config.json", "eval.json", "checkpoints"):
    path = os.path.join(workdir, name)
    stamp.append(os.stat(path).st_mtime_ns if os.path.exists(path) else None)
  ckpt = os.path.join(workdir, "checkpoints")
  stamp.append(tuple(sorted(os.listdir(ckpt))) if os.path.isdir(ckpt) else None)
  key = (workdir, tuple(stamp))
  if key not in _LOADED:
    if len(_LOADED) >= 4:
      _LOADED.pop(next(iter(_LOADED)))
    _LOADED[key] = load_autoencoder(workdir)
  return _LOADED[key]



class _Parser(argparse.ArgumentParser):
  """argparse whose errors are UserErrors (one line, exit 2) instead of usage dumps."""

  def error(self, message):
    raise UserError(message)


def _size(value):
  if value == "native":
    return 0
  try:
    size = int(value)
  except ValueError:
    raise argparse.ArgumentTypeError(f"{value!r} is not a size: give S (pixels) or native") from None
  if size < 1:
    raise argparse.ArgumentTypeError(f"{value} must be >= 1 (or native)")
  return size


def _parser():
  p = _Parser(prog="python -m unimm.tokenize", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", parser_class=_Parser, required=True,
                         metavar="{encode,decode,reconstruct}")
  for name in ("reconstruct", "encode", "decode"):
    s = sub.add_parser(name)
    s.add_argument("--tokenizer", required=True,
                   help="a workdir of python -m unimm.train.autoencoder")
    s.add_argument("--input", required=True,
                   help="decode: a folder of .npy; otherwise an image folder or file, a converted "
                        "data folder, shapes or skimage")
    s.add_argument("--output", required=True, help="the folder to write")
    s.add_argument("--limit", type=int, default=None,
                   help="at most N inputs (images, records or .npy files; shapes: default 64)")
    s.add_argument("--batch-size", type=int, default=16)
    if name != "decode":
      s.add_argument("--image-size", dest="size", type=_size, default=None,
                     help="S: resize / crop to S x S (default: the tokenizer's training size); "
                          "native: keep the size, cropped to a multiple of f")
      s.add_argument("--max-tokens", type=int, default=128 * 128,
                     help="native: skip images with more latent positions (too_many_tokens)")
      s.add_argument("--seed", type=int, default=None,
                     help="--input shapes: the scenes' seed (default: the tokenizer's eval_seed)")
    if name == "encode":
      s.add_argument("--keep-images", action="store_true",
                     help="latent cache: keep each image's bytes beside its latent")
      s.add_argument("--docs-per-shard", type=int, default=10_000)
  return p


def main(argv) -> dict:
  """Runs a subcommand; returns the summary also printed as the last stdout line."""
  args = _parser().parse_args(argv)
  if args.batch_size < 1:
    raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
  if args.limit is not None and args.limit < 0:
    raise UserError(f"--limit must be >= 0, got {args.limit}")
  if args.command == "encode" and args.docs_per_shard < 1:
    raise UserError(f"--docs-per-shard must be >= 1, got {args.docs_per_shard}")
  if not os.path.isdir(args.tokenizer):
    raise UserError(f"--tokenizer {args.tokenizer!r} is not a folder: give the --workdir of "
                    "python -m unimm.train.autoencoder")
  check_input(args)
  ae = _load(args.tokenizer)
  if args.command != "decode":
    if args.size is None:
      args.size = ae.image_size
      if not args.size:
        raise UserError(f"tokenizer {ae.workdir} does not record its training image size: "
                        "give --image-size S")
    if args.size and args.size % ae.factor:
      raise UserError(f"--image-size {args.size} is not a multiple of the tokenizer's "
                      f"downsampling factor {ae.factor}")
    tokens = (args.size // ae.factor) ** 2
    if args.size and tokens > args.max_tokens:
      raise UserError(f"--image-size {args.size} gives {tokens} latent positions per image, more "
                      f"than --max-tokens {args.max_tokens}: use a smaller size or raise it")
    # the mid-block attention holds batch x tokens^2 scores: at most 2^15 x tokens of them;
    # native sizes go one image at a time
    args.batch_size = min(args.batch_size, max(1, ATTENTION_BUDGET // tokens)) if args.size else 1
  return {"reconstruct": reconstruct, "encode": encode, "decode": decode}[args.command](ae, args)


if __name__ == "__main__":
  cli(main)
