"""Documents -> packed training batches (Grain).

    source[i] (document dict, see `unimm.data.document`)
      -> condition_dropout      (classifier-free guidance: drop the prompt)
      -> encode_document        (1-D arrays, one entry per sequence position)
      -> first-fit packing      (several documents per row of data.seq_len)
      -> batch                  (per-process rows)

A batch is a dict of numpy arrays, the contract with the model and the loss:

    tokens       int32   [B, L]     input ids (image positions hold pad)
    targets      int32   [B, L]     next id (tokens shifted left, last = pad)
    loss_mask    float32 [B, L]     1 where the LM loss applies to targets
    patches      float32 [B, L, D]  image patches at image positions, else 0
    modality     int32   [B, L]     TEXT / CLEAN_IMAGE / NOISED_IMAGE
    image_ids    int32   [B, L]     1-based image index within its document
    patch_index  int32   [B, L]     row-major patch index within its image
    segment_ids  int32   [B, L]     1.. per packed document, 0 = padding
    positions    int32   [B, L]     position within its document (from 0)

Padding positions are all zero (segment 0, modality TEXT, loss 0) except
tokens/targets, which hold the tokenizer's pad id. image_ids restart per
document: (segment_ids, image_ids) names an image within a row.
"""

import math

import grain
import numpy as np

from unimm.data.document import CLEAN_IMAGE, NOISED_IMAGE, TEXT
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.models.image_tokenizer import PixelPatches

# Per-position features encode_document emits (all packed to seq_len).
FEATURES = ("tokens", "targets", "loss_mask", "patches", "modality",
            "image_ids", "patch_index")
BATCH_KEYS = FEATURES + ("segment_ids", "positions")
BATCH_DTYPES = {k: np.int32 for k in BATCH_KEYS} | {
    "loss_mask": np.float32, "patches": np.float32}

# MapDataset -> IterDataset read-ahead: two threads overlap reading and
# encoding with the consumer (the work is mostly Python, so more threads only
# contend for the GIL; use data.num_workers to scale), and a bounded buffer
# (each encoded document carries an [n, D] float32 patch array).
_READ_OPTIONS = dict(num_threads=2, prefetch_buffer_size=32)


# ----------------------------------------------------------------- encoding


def encode_document(doc, tok, patcher, *, add_eos=True, seq_len=None):
  """One document -> dict of equal-length 1-D arrays (one entry per position).

  Layout: `<bos>`, then per segment in order: text -> its token ids; image ->
  `<boi>`, `patcher.num_patches` image positions, `<eoi>`; finally `<eos>` if
  add_eos.

  Loss mask (next-token LM loss on targets[i] = tokens[i+1]): loss_mask[i] = 1
  iff position i is not an image position, position i+1 is not an image
  position, and the token at i+1 "has loss", where:
    * a text token has loss iff its text segment has loss=True;
    * `<boi>` belongs to its image: it has loss iff the image's role is
      "target" (the model learns when to start generating an image; never for
      condition images, which are given);
    * `<eoi>` never has loss (it always follows the last patch);
    * `<eos>` has loss iff the document ends in a target image or the last
      text segment of the document has loss=True;
    * `<bos>` is never a target; the last position has no target (loss 0).
  Image positions never get LM loss; target images get the flow loss instead
  (modality NOISED_IMAGE), condition images are context (CLEAN_IMAGE).

  Raises UserError for an unknown segment kind, a non-uint8 image or one of
  the wrong size/channels (naming the task and segment index), and for a
  document longer than seq_len. For the built-in sources a too-long document
  means data.seq_len is too small for data.image_size / the task texts, a
  config mismatch, so it fails loudly instead of silently skipping documents.
  """
  task = doc.get("task", "?")
  runs = _Runs(tok.pad_id, patcher)
  runs.special(tok.bos_id, loss=False)
  num_images, last_text_loss, ends_in_target = 0, False, False
  for k, seg in enumerate(doc["segments"]):
    kind = seg.get("kind")
    if kind == "text":
      last_text_loss = bool(seg.get("loss", True))
      runs.text(tok.encode(seg["text"]), loss=last_text_loss)
      ends_in_target = False
    elif kind == "image":
      num_images += 1
      target = seg.get("role") == "target"
      patches = _encode_image(seg["image"], patcher, task, k)
      runs.special(tok.boi_id, loss=target)
      runs.image(patches, num_images, NOISED_IMAGE if target else CLEAN_IMAGE)
      runs.special(tok.eoi_id, loss=False)
      ends_in_target = target
    else:
      raise UserError(
          f"document (task {task!r}) segment {k} has kind {kind!r}: segments "
          "must be built with unimm.data.document.text(...) or image(...)")
  if add_eos:
    runs.special(tok.eos_id, loss=last_text_loss or ends_in_target)
  out = runs.finish()
  n = len(out["tokens"])
  if seq_len is not None and n > seq_len:
    raise UserError(
        f"a {task!r} document needs {n} positions but data.seq_len is "
        f"{seq_len}: raise data.seq_len to at least {n} (or lower "
        "data.image_size / raise model.patch_size)")
  return out


def _encode_image(image, patcher, task, k):
  """Checks one image (dtype, size, channels) and cuts it into patches."""
  what = f"document (task {task!r}) segment {k} image"
  dtype = getattr(image, "dtype", None)
  if dtype != np.uint8:
    raise UserError(
        f"{what} has dtype {dtype}, expected uint8 pixels in [0, 255]: "
        "convert it with np.asarray(image).astype(np.uint8)")
  patcher.check(image, what=what)
  return np.asarray(patcher.encode(image), dtype=np.float32)


class _Runs:
  """Accumulates runs of positions (ids in a list), then builds the arrays.

  Per-run attributes are expanded with np.repeat once, in finish(), which
  keeps encoding to a handful of numpy calls per document.
  """

  def __init__(self, pad_id, patcher):
    self.pad_id = pad_id
    self.num_patches = patcher.num_patches
    self.patch_dim = patcher.patch_dim
    self.ids = []
    self.runs = []    # (length, has_loss, modality, image_id) per run
    self.images = []  # (start position, [N, D] patches) per image

  def text(self, ids, loss):
    self.ids.extend(ids)
    self.runs.append((len(ids), loss, TEXT, 0))

  def special(self, token_id, loss):
    self.text((token_id,), loss)

  def image(self, patches, image_id, modality):
    self.images.append((len(self.ids), patches))
    self.ids.extend([self.pad_id] * self.num_patches)
    self.runs.append((self.num_patches, False, modality, image_id))

  def finish(self):
    n = len(self.ids)
    tokens = np.array(self.ids, np.int32)
    lengths, has_loss, modality, image_ids = (
        np.array(column) for column in zip(*self.runs))
    has_loss = np.repeat(has_loss.astype(bool), lengths)
    modality = np.repeat(modality.astype(np.int32), lengths)
    is_text = modality == TEXT
    targets = np.full(n, self.pad_id, np.int32)
    targets[:-1] = tokens[1:]
    loss_mask = np.zeros(n, np.float32)
    loss_mask[:-1] = is_text[:-1] & is_text[1:] & has_loss[1:]
    patches = np.zeros((n, self.patch_dim), np.float32)
    patch_index = np.zeros(n, np.int32)
    for start, p in self.images:
      patches[start:start + len(p)] = p
      patch_index[start:start + len(p)] = np.arange(len(p))
    return {
        "tokens": tokens, "targets": targets, "loss_mask": loss_mask,
        "patches": patches, "modality": modality,
        "image_ids": np.repeat(image_ids.astype(np.int32), lengths),
        "patch_index": patch_index,
    }


# --------------------------------------------------------- condition dropout


def condition_dropout(doc, rng, p):
  """With probability p, drops the text before the first target image.

  This trains the unconditional branch for classifier-free guidance. Only
  text segments before the first target image go; images (e.g. the source
  image of an edit) and everything after stay. Documents without a target
  image are returned unchanged. The input is never mutated; a dropped copy
  carries meta["cfg_dropped"] = True. One draw from `rng` per call.
  """
  drop = rng.random() < p
  segments = doc["segments"]
  first = next((k for k, s in enumerate(segments)
                if s.get("kind") == "image" and s.get("role") == "target"), None)
  if not drop or first is None:
    return doc
  kept = [s for k, s in enumerate(segments) if k >= first or s["kind"] != "text"]
  meta = dict(doc.get("meta") or {}, cfg_dropped=True)
  return {**doc, "segments": kept, "meta": meta}


class _DropConditions(grain.transforms.RandomMap):
  """Grain transform: condition_dropout with the per-element rng."""

  def __init__(self, p):
    self.p = float(p)

  def random_map(self, doc, rng):
    return condition_dropout(doc, rng, self.p) if self.p > 0 else doc


class _Encode(grain.transforms.Map):
  """Grain transform: encode_document with a fixed tokenizer and patcher."""

  def __init__(self, tok, patcher, seq_len):
    self.tok, self.patcher, self.seq_len = tok, patcher, seq_len

  def map(self, doc):
    return encode_document(doc, self.tok, self.patcher, seq_len=self.seq_len)


def _finish_packed(row):
  """Keeps one segment_ids/positions pair (from tokens), drops the rest."""
  out = {k: row[k] for k in FEATURES}
  out["segment_ids"] = row["tokens_segment_ids"]
  out["positions"] = row["tokens_positions"]
  return out


# ------------------------------------------------------------------ dataset


def make_source(cfg):
  """The random-access document source for cfg (len + getitem -> document).

  Today: the built-in Shapes world. Real datasets and mixtures plug in here.
  """
  from unimm.data.shapes import ShapesSource  # pylint: disable=import-outside-toplevel
  d = cfg.data
  return ShapesSource(
      seed=cfg.seed, image_size=d.image_size, tasks=dict(d.tasks),
      two_object_prob=d.two_object_prob)


def per_process_batch(global_batch, process_count):
  """data.batch_size is global; each process loads its share."""
  if global_batch <= 0 or global_batch % process_count:
    raise UserError(
        f"data.batch_size {global_batch} is not a positive multiple of the "
        f"process count {process_count}: set data.batch_size to a multiple of "
        f"{process_count}")
  return global_batch // process_count


def make_dataset(cfg, *, process_index=0, process_count=1, source=None):
  """The Grain pipeline for cfg: an IterDataset of per-process batches.

  `source` overrides make_source(cfg) (tests, custom data). Every process
  reads a disjoint slice of one shuffled, endlessly repeated index stream;
  condition dropout is seeded by the global index, so a document's dropout
  decision does not depend on the process layout.
  """
  d = cfg.data
  batch = per_process_batch(int(d.batch_size), process_count)
  if not 0 <= process_index < process_count:
    raise UserError(
        f"process_index {process_index} is outside [0, {process_count})")
  if int(d.pack_bins) < 1:
    raise UserError(f"data.pack_bins is {d.pack_bins}: set it to 1 or more")
  seq_len = int(d.seq_len)
  tok = load_tokenizer(d.tokenizer)
  patcher = PixelPatches(int(d.image_size), int(cfg.model.patch_size))
  source = make_source(cfg) if source is None else source

  ds = grain.MapDataset.source(source).seed(int(cfg.seed)).shuffle()
  ds = ds.repeat(None).random_map(_DropConditions(d.cfg_dropout))
  ds = ds[process_index::process_count]
  ds = ds.map(_Encode(tok, patcher, seq_len))
  it = ds.to_iter_dataset(grain.ReadOptions(**_READ_OPTIONS))
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct={k: seq_len for k in FEATURES},
      num_packing_bins=int(d.pack_bins), seed=int(cfg.seed),
      padding_struct=_padding(tok.pad_id))
  it = it.map(_finish_packed).batch(batch, drop_remainder=True)
  if int(d.num_workers) > 0:
    _allow_unparsed_absl_flags()
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(d.num_workers)))
  return it


def _allow_unparsed_absl_flags():
  """Grain's worker pool reads absl flags; without absl.app they're unparsed.

  Marking them parsed keeps every default (google/grain#1355 workaround).
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _padding(pad_id):
  """Packing fill values: pad id for tokens/targets, zeros elsewhere."""
  pad = {k: None for k in FEATURES}  # None -> zeros
  pad["tokens"] = pad["targets"] = pad_id
  return pad


def make_iterator(cfg, *, process_index=0, process_count=1, source=None):
  """iter(make_dataset(...)): get_state()/set_state() resume exactly."""
  return iter(make_dataset(cfg, process_index=process_index,
                           process_count=process_count, source=source))


# --------------------------------------------------------------- validation


def validate_batch(batch, *, seq_len, patch_dim, batch_size):
  """Raises a one-line UserError if batch breaks the batch contract."""
  if not hasattr(batch, "keys"):
    raise UserError(
        f"a batch must be a dict of arrays with keys {list(BATCH_KEYS)}, got "
        f"{type(batch).__name__}")
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise UserError(
        f"batch is missing keys {missing}: a batch needs {list(BATCH_KEYS)} "
        "(see unimm.data.pipeline)")
  for k in BATCH_KEYS:
    x = batch[k]
    want = (batch_size, seq_len) + ((patch_dim,) if k == "patches" else ())
    shape = tuple(getattr(x, "shape", ()))
    if k == "patches" and shape[:2] == want[:2] and len(shape) == 3:
      if shape[2] != patch_dim:
        raise UserError(_patch_dim_message(shape[2], patch_dim, batch))
    if shape != want:
      raise UserError(
          f"batch[{k!r}] has shape {shape}, expected {want} "
          "(data.batch_size per process, data.seq_len"
          f"{', patch_dim' if k == 'patches' else ''})")
    dtype = np.dtype(getattr(x, "dtype", object))
    if dtype != BATCH_DTYPES[k]:
      name = np.dtype(BATCH_DTYPES[k]).name
      raise UserError(
          f"batch[{k!r}] has dtype {dtype}, expected {name}: convert it with "
          f".astype(np.{name})")


def _patch_dim_message(got, want, batch):
  """Explains a patch-dim mismatch as patch size x channels (x image size)."""
  return (f"batch['patches'] has last dim {got}, expected patch_dim {want} "
          f"({_describe_patch_dim(want)}); the data has "
          f"{_describe_patch_dim(got, batch)}: set data.image_size / "
          "model.patch_size to match the data")


def _describe_patch_dim(dim, batch=None):
  """'8x8 patches x 3 channels' (+ implied image size from patch_index)."""
  for channels in (3, 1, 4):
    p = math.isqrt(dim // channels)
    if dim % channels == 0 and p * p * channels == dim:
      text = f"{p}x{p} patches x {channels} channels"
      if batch is not None:
        text += _implied_image_size(batch, p)
      return text
  return f"{dim} values per patch"


def _implied_image_size(batch, p):
  """', image_size S' from the largest patch_index, where it is a square."""
  try:
    index = np.asarray(batch["patch_index"])
    modality = np.asarray(batch["modality"])
    num_patches = int(index[modality != TEXT].max()) + 1
  except (KeyError, ValueError, TypeError):
    return ""
  grid = math.isqrt(num_patches)
  return f", image_size {grid * p}" if grid * grid == num_patches else ""
