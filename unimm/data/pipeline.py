"""Documents -> packed training batches (Grain).

    per source of data.mixture ("shapes" or a folder of unimm.data.convert):
      source[i]                 (a document dict, or a record of `records`)
      -> shuffle, repeat        (a new order every epoch)
      -> [process::processes]   (shard after repeat: no record twice or lost)
      -> _Load                  (decode into aspect buckets, caption flip,
                                 condition_dropout, encode_document; bad
                                 records become counted skip markers; an
                                 interleaved document longer than data.seq_len
                                 is split at segment boundaries, `split_document`)
      -> _Chunks                (a split record's chunks, one document each)
    -> IterDataset.mix          (by weight)
    -> _CountSkips              (skip counts ride along with the documents)
    -> first-fit packing        (several documents per row of data.seq_len)
    -> batch (_collate)         (per-process rows), mp_prefetch (num_workers)
    -> DataIterator             (counts, error threshold, checkpoint state)

A batch is a dict of numpy arrays, the contract with the model and the loss:

    tokens       int32   [B, L]     input ids (image positions hold pad)
    targets      int32   [B, L]     next id (tokens shifted left, last = pad)
    loss_mask    float32 [B, L]     1 where the LM loss applies to targets
    patches      float32 [B, L, D]  image patches at image positions, else 0
    modality     int32   [B, L]     TEXT / CLEAN_IMAGE / NOISED_IMAGE
    image_ids    int32   [B, L]     1-based image index within its document
    patch_index  int32   [B, L]     row * max_cols + col of the patch in its image
    pixels       uint8   [B, L, P]  vae / vq: pixels of the image tokens to encode, else 0
    encode       int32   [B, L]     1 at those tokens (the train step encodes them)
    segment_ids  int32   [B, L]     1.. per packed document, 0 = padding
    positions    int32   [B, L]     position within its document (from 0)

Padding positions are all zero (segment 0, modality TEXT, loss 0) except
tokens/targets, which hold the tokenizer's pad id. image_ids restart per
document: (segment_ids, image_ids) names an image within a row. The pipeline runs
no model: vae / vq images arrive as pixels (`unimm.image_grid`), and their
tokens hold the pad id until the train step encodes them.
"""

import json
import math
import os

import grain
import numpy as np

from unimm.batch import (BATCH_DTYPES, BATCH_KEYS, BATCH_NDIM, CLEAN_IMAGE, FEATURES,
                         NOISED_IMAGE, TEXT)
from unimm.data import records
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.image_grid import image_grid


# ----------------------------------------------------------------- encoding


def encode_document(doc, tok, patcher, *, add_eos=True, seq_len=None, answer_len=0):
  """One document -> dict of equal-length 1-D arrays (one entry per position).

  Layout: `<bos>`, then per segment in order: text -> its token ids; image ->
  `<boi>`, one position per patch (row-major; patch_index from
  `patcher.patch_index`), `<eoi>`; finally `<eos>` if add_eos (repeated, with loss, until a
  final text with loss and its `<eos>`s fill answer_len tokens: text diffusion's answer
  padding). `patcher` is an image grid (`unimm.image_grid`): pixel patches go into `patches`; vae / vq
  images into `pixels` (encode = 1), for the train step to encode; latent-cache
  images are cut into `patches` (vae) or code ids in `tokens` (vq).

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
  num_images, last_text_loss, ends_in_target, answer = 0, False, False, 0
  for k, seg in enumerate(doc["segments"]):
    kind = seg.get("kind")
    if kind == "text":
      last_text_loss = bool(seg.get("loss", True))
      ids = tok.encode(seg["text"])
      runs.text(ids, loss=last_text_loss)
      ends_in_target, answer = False, len(ids) if last_text_loss else 0
    elif kind == "image":
      num_images += 1
      target = seg.get("role") == "target"
      runs.special(tok.boi_id, loss=target)
      coder = patcher
      if getattr(patcher, "understanding", None) is not None and not target:
        coder = patcher.understanding  # Janus-Pro: condition images as pixel patches
      slot, values, index = _encode_image(seg, coder, task, k)
      if getattr(coder, "causal", False):
        # early fusion: codes are tokens like text, next-token loss on targets
        runs.image(slot, values, index, 0, TEXT, loss=target)
      else:
        runs.image(slot, values, index, num_images, NOISED_IMAGE if target else CLEAN_IMAGE,
                   loss=False)
      runs.special(tok.eoi_id, loss=False)
      ends_in_target, answer = target, 0
    else:
      raise UserError(
          f"document (task {task!r}) segment {k} has kind {kind!r}: segments "
          "must be built with unimm.data.document.text(...) or image(...)")
  if add_eos:
    runs.text((tok.eos_id,) * max(1, answer_len - answer if answer else 1),
              loss=last_text_loss or ends_in_target)
  out = runs.finish()
  n = len(out["tokens"])
  if seq_len is not None and n > seq_len:
    raise UserError(
        f"a {task!r} document needs {n} positions but data.seq_len is "
        f"{seq_len}: raise data.seq_len to at least {n} (or lower "
        "data.image_size / raise model.patch_size)")
  return out


def _encode_image(seg, patcher, task, k):
  """One image segment -> (slot, values, patch_index [N]), slot naming where the values go:
  "patches" (pixel patches, or vae latent patches of a latent cache: [N, D]), "tokens" (vq
  code ids of a latent cache: [N]) or "pixels" (vae / vq: uint8 [N, P], to encode).

  Checks the image (dtype, size, channels); a segment from a latent cache (`latent`: the
  tokenizer's output, see unimm.tokenize) is only cut into tokens."""
  what = f"document (task {task!r}) segment {k} image"
  if "latent" in seg:
    if not hasattr(patcher, "from_latent"):
      raise UserError(f"{what} is a cached latent but model.image_tokenizer is 'pixels': "
                      "train on the source images, or set model.image_tokenizer to the cache's")
    tokens = patcher.from_latent(seg["latent"])
    if len(tokens) != patcher.num_patches:
      raise UserError(f"{what}: the cached latent has {len(tokens)} tokens, the config "
                      f"{patcher.num_patches}: encode the cache at data.image_size")
    slot = "tokens" if getattr(patcher, "discrete", False) else "patches"
    return slot, tokens, patcher.patch_index(patcher.grid, patcher.grid)
  image = seg["image"]
  dtype = getattr(image, "dtype", None)
  if dtype != np.uint8:
    raise UserError(
        f"{what} has dtype {dtype}, expected uint8 pixels in [0, 255]: "
        "convert it with np.asarray(image).astype(np.uint8)")
  patcher.check(image, what=what)
  index = patcher.patch_index(image.shape[0] // patcher.patch_size,
                              image.shape[1] // patcher.patch_size)
  if patcher.pixel_dim:
    return "pixels", patcher.pixels(image), index
  return "patches", np.asarray(patcher.encode(image), dtype=np.float32), index


class _Runs:
  """Accumulates runs of positions (ids in a list), then builds the arrays.

  Per-run attributes are expanded with np.repeat once, in finish(), which
  keeps encoding to a handful of numpy calls per document.
  """

  def __init__(self, pad_id, patcher):
    self.pad_id = pad_id
    self.patch_dim, self.pixel_dim = patcher.patch_dim, patcher.pixel_dim
    self.ids = []
    self.runs = []    # (length, has_loss, modality, image_id) per run
    self.images = []  # (start position, slot, values, [N] patch_index) per image

  def text(self, ids, loss):
    self.ids.extend(ids)
    self.runs.append((len(ids), loss, TEXT, 0))

  def special(self, token_id, loss):
    self.text((token_id,), loss)

  def image(self, slot, values, index, image_id, modality, loss):
    """An image's positions; `values` go into its slot (see _encode_image): code ids are its
    tokens, otherwise its tokens are pad."""
    self.images.append((len(self.ids), slot, values, index))
    self.ids.extend(values.tolist() if slot == "tokens" else [self.pad_id] * len(index))
    self.runs.append((len(index), loss, modality, image_id))

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
    pixels = np.zeros((n, self.pixel_dim), np.uint8)
    encode = np.zeros(n, np.int32)
    patch_index = np.zeros(n, np.int32)
    for start, slot, values, index in self.images:
      at = slice(start, start + len(index))
      if slot == "patches":
        patches[at] = values
      elif slot == "pixels":
        pixels[at], encode[at] = values, 1
      patch_index[at] = index
    return {
        "tokens": tokens, "targets": targets, "loss_mask": loss_mask,
        "patches": patches, "modality": modality,
        "image_ids": np.repeat(image_ids.astype(np.int32), lengths),
        "patch_index": patch_index, "pixels": pixels, "encode": encode,
    }


# --------------------------------------------------------- condition dropout


def condition_dropout(doc, rng, p, p_image=0.0):
  """With probability p, drops the text before the first target image; with probability
  p_image (a second, independent draw, made only when p_image > 0), the images before it.

  This trains the unconditional branches for classifier-free guidance (with both,
  InstructPix2Pix's three-way dropout: text only, image only, both). Everything from the first
  target image on stays. Documents without a target image are returned unchanged. The input is
  never mutated; a dropped copy carries meta["cfg_dropped"] = True (text) and / or
  meta["image_dropped"] = True.
  """
  drop = rng.random() < p
  drop_image = p_image > 0 and rng.random() < p_image
  segments = doc["segments"]
  first = next((k for k, s in enumerate(segments)
                if s.get("kind") == "image" and s.get("role") == "target"), None)
  if not (drop or drop_image) or first is None:
    return doc
  gone = {"text"} if drop else set()
  gone |= {"image"} if drop_image else set()
  kept = [s for k, s in enumerate(segments) if k >= first or s["kind"] not in gone]
  meta = dict(doc.get("meta") or {})
  meta.update({"cfg_dropped": True} if drop else {})
  meta.update({"image_dropped": True} if drop_image else {})
  return {**doc, "segments": kept, "meta": meta}


def recaptioned(doc):
  """A pair whose meta holds a model's caption (`python -m unimm.data.curate --recaption`)
  with that caption as its text; any other document unchanged."""
  new = (doc.get("meta") or {}).get("recaption")
  texts = [k for k, g in enumerate(doc["segments"]) if g["kind"] == "text"]
  if not isinstance(new, str) or not new.strip() or len(texts) != 1:
    return doc
  segments = list(doc["segments"])
  segments[texts[0]] = dict(segments[texts[0]], text=new)
  return {**doc, "segments": segments}


def caption_pair(doc):
  """A text-to-image pair [caption, image(target)] -> captioning document
  [image(condition), caption]; any other document unchanged."""
  segs = doc["segments"]
  if (doc.get("task") == "t2i" and len(segs) == 2 and segs[0]["kind"] == "text"
      and segs[1]["kind"] == "image"):
    image = dict(segs[1], role="condition")
    return {**doc, "task": "caption", "segments": [image, dict(segs[0], loss=True)]}
  return doc


# ------------------------------------------------------------------ sources


class ConvertedSource:
  """Random-access records of a folder written by `unimm.data.convert`
  (ArrayRecord shards; record i -> packed bytes, see `unimm.data.records`)."""

  def __init__(self, directory):
    self.directory = directory
    self.paths = records.shard_paths(directory)
    try:
      self._source = grain.sources.ArrayRecordDataSource(self.paths)
    except Exception as e:  # noqa: BLE001 - a damaged shard: name it
      raise records.shard_error(self.paths, e) from None

  def __len__(self):
    return len(self._source)

  def __getitem__(self, index):
    return self._source[index]

  def __repr__(self):
    return f"ConvertedSource({self.directory!r}, {len(self.paths)} shards)"


def parse_mixture(spec):
  """data.mixture "shapes:0.7,/data/pairs:0.3" -> [(name, location, weight)].

  A location is "shapes" (the built-in world) or a converted folder; its name
  is "shapes" or the folder's basename (made unique). Weight defaults to 1.
  """
  out, names = [], set()
  for part in [p.strip() for p in str(spec).split(",") if p.strip()]:
    location, _, weight = part.rpartition(":") if ":" in part else (part, "", "1")
    try:
      w = float(weight)
    except ValueError:
      location, w = part, 1.0
    if not w > 0:
      raise UserError(f"data.mixture entry {part!r} has weight {weight}: weights must be > 0")
    name = "shapes" if location == "shapes" else os.path.basename(os.path.normpath(location))
    base, k = name, 1
    while name in names:
      k += 1
      name = f"{base}_{k}"
    names.add(name)
    out.append((name, location, w))
  if not out:
    raise UserError("data.mixture is empty: give e.g. 'shapes' or 'shapes:0.5,/path/converted:0.5'")
  return out


def describe_mixture(cfg):
  """One line per source of data.mixture: its weight share and, for converted
  folders, what the conversion wrote and skipped (their info.json)."""
  mixture = parse_mixture(getattr(cfg.data, "mixture", "shapes"))
  total = sum(w for _, _, w in mixture)
  lines = []
  for name, location, weight in mixture:
    head = f"data source {name!r} ({weight / total:.0%} of records)"
    if location == "shapes":
      lines.append(f"{head}: the built-in Shapes world")
      continue
    try:
      with open(os.path.join(location, records.INFO_FILE)) as f:
        info = json.load(f)
      lines.append(f"{head}: {location}, {info.get('documents')} documents with "
                   f"{info.get('images')} images converted from {info.get('format')}; "
                   f"skipped at conversion {info.get('skipped') or 'none'}, repaired "
                   f"{info.get('repaired') or 'none'}")
    except (OSError, ValueError):
      lines.append(f"{head}: {location} (no {records.INFO_FILE})")
  return lines


def make_sources(cfg):
  """{name: (random-access source, weight)} for data.mixture."""
  d = cfg.data
  out = {}
  for name, location, weight in parse_mixture(getattr(d, "mixture", "shapes")):
    if location == "shapes":
      from unimm.data.shapes import ShapesSource  # pylint: disable=import-outside-toplevel
      src = ShapesSource(seed=cfg.seed, image_size=d.image_size, tasks=dict(d.tasks),
                         two_object_prob=d.two_object_prob)
    else:
      src = ConvertedSource(location)
      check_latent_cache(location, cfg)
    out[name] = (src, weight)
  return out


def check_latent_cache(location, cfg):
  """A latent cache (written by `python -m unimm.tokenize encode`) streams only into
  a model whose image tokenizer made it: same tokenizer workdir and image size.
  Returns whether `location` is one."""
  try:
    with open(os.path.join(location, records.INFO_FILE)) as f:
      made = json.load(f).get("tokenizer")
  except (OSError, ValueError):
    return False
  if not made:
    return False
  m = cfg.model
  want = os.path.abspath(m.tokenizer_path) if m.tokenizer_path else ""
  if m.image_tokenizer != made.get("kind") or want != os.path.abspath(made.get("workdir", "")):
    raise UserError(
        f"data source {location} is a latent cache of the {made.get('kind')} tokenizer in "
        f"{made.get('workdir')}; this run has model.image_tokenizer='{m.image_tokenizer}', "
        f"model.tokenizer_path='{m.tokenizer_path}': set them to the cache's tokenizer")
  if int(made.get("image_size", 0)) != int(cfg.data.image_size):
    raise UserError(f"data source {location} was encoded at image size {made.get('image_size')}; "
                    f"set data.image_size={made.get('image_size')}")
  return True


# ------------------------------------------------------------ record loading


class _Load(grain.transforms.Map):
  """(record, its index in the source's repeated stream[, its record id]) -> encoded
  document (with `origin`: source and record id, which name a bad batch's records), or a
  skip marker

      {"skip": reason, "detail": str, "source": k}

  for a record that cannot be used (counted downstream, never raised), or, for an interleaved
  document longer than data.seq_len, {"chunks": [encoded documents], "source": k}
  (`split_document`; each chunk keeps the record's origin, `_Chunks` expands them). Raw
  records (bytes) are unpacked and their images decoded into the nearest
  aspect-ratio bucket; built-in documents (dicts of arrays) go straight on.
  Its random decisions (condition dropout, caption flip) draw from
  (data seed, source, index), so they do not depend on the process layout.
  """

  def __init__(self, k, tok, patcher, data_cfg, seed=0):
    self.k, self.tok, self.patcher, self.seed = k, tok, patcher, seed
    self.seq_len = int(data_cfg.seq_len)
    self.dropout = float(data_cfg.cfg_dropout)
    self.image_dropout = float(getattr(data_cfg, "image_dropout", 0.0))
    self.caption_prob = float(getattr(data_cfg, "pair_caption_prob", 0.0))
    self.recaption_prob = float(getattr(data_cfg, "recaption_prob", 0.0))
    self.answer_len = int(getattr(data_cfg, "answer_len", 0))

  def map(self, element):
    record, index, *record_id = element
    origin = np.array([self.k, record_id[0] if record_id else index], np.int64)
    try:
      rng = np.random.default_rng([self.seed, self.k, index])
      if isinstance(record, dict):
        doc = record
      else:
        doc = self._decode(records.unpack(record))
        if self.recaption_prob > 0 and rng.random() < self.recaption_prob:
          doc = recaptioned(doc)
        if self.caption_prob > 0 and rng.random() < self.caption_prob:
          doc = caption_pair(doc)
      if self.dropout > 0 or self.image_dropout > 0:
        doc = condition_dropout(doc, rng, self.dropout, self.image_dropout)
      out = encode_document(doc, self.tok, self.patcher, answer_len=self.answer_len)
      n = len(out["tokens"])
      if n <= self.seq_len:
        return {**_to_packed(out), "source": self.k, "origin": origin}
      if doc.get("task") not in SPLIT_TASKS:
        raise records.Skip(TOO_LONG, f"a {doc.get('task')!r} document needs {n} positions but "
                           f"data.seq_len is {self.seq_len}")
      chunks = split_document(doc, self.tok, self.patcher, self.seq_len)
      return {"chunks": [{**_to_packed(encode_document(c, self.tok, self.patcher,
                                                       answer_len=self.answer_len)),
                          "origin": origin} for c in chunks], "source": self.k}
    except records.Skip as e:
      return {"skip": e.reason, "detail": e.detail, "source": self.k}

  def _decode(self, doc):
    segments = []
    for seg in doc["segments"]:
      if seg["kind"] == "image" and "latent" in seg:  # a latent cache: already tokenized
        seg = {"kind": "image", "role": seg.get("role", "condition"),
               "latent": records.read_latent(seg)}
      elif seg["kind"] == "image":
        seg = {"kind": "image", "role": seg.get("role", "condition"),
               "image": records.decode_image(seg["bytes"], bucket=self.patcher.bucket_size)}
      segments.append(seg)
    return {**doc, "segments": segments}


# ------------------------------------------------------------ long documents

# Tasks whose documents are split at segment boundaries when longer than data.seq_len (the
# interleaved web documents of mmc4 / obelics); any other too-long document is skipped.
SPLIT_TASKS = ("interleaved",)


def split_document(doc, tok, patcher, seq_len):
  """A document longer than seq_len -> [documents], consecutive runs of its whole segments in
  order, each encoding to <= seq_len positions (with its own <bos> / <eos>), as
  interleaved-data trainers do.

  Greedy: a chunk takes segments while they fit; a chunk ending in a text followed by an
  image that did not fit hands that text on, so the next chunk starts with the text that
  leads into its image (where the text and image fit together). A segment that alone needs
  more than seq_len positions makes the document a Skip("too_long")."""
  segments, task = doc["segments"], doc.get("task")
  sizes = [len(encode_document({**doc, "segments": [seg]}, tok, patcher, add_eos=False)["tokens"])
           - 1 for seg in segments]  # minus <bos>: encodings add up, plus <bos> and <eos>
  room = seq_len - 2
  for k, n in enumerate(sizes):
    if n > room:
      raise records.Skip(TOO_LONG, f"segment {k} of a {task!r} document needs {n + 2} "
                         f"positions but data.seq_len is {seq_len}")
  chunks, start, used = [], 0, 0
  for k, n in enumerate(sizes):
    if used + n <= room:
      used += n
      continue
    end = k
    if (k - start > 1 and segments[k - 1].get("kind") == "text"
        and segments[k].get("kind") == "image" and sizes[k - 1] + n <= room):
      end = k - 1  # the text leading into the image starts the next chunk
    chunks.append(segments[start:end])
    start, used = end, sum(sizes[end:k + 1])
  chunks.append(segments[start:])
  return [{**doc, "segments": c} for c in chunks]


class _Chunks(grain.IterDataset):
  """One source's stream with each split record ({"chunks": [...]}, from _Load) expanded
  into its documents; the first carries part 0, the others part 1, 2, ... (`_CountSkips`
  counts the record once, as read and split).

  Checkpoint state: within a split record, the parent's state before that record plus
  "chunk" (the next chunk; the record is read and split again on restore, deterministically);
  otherwise the parent's own state, so a state saved before splitting existed restores."""

  def __iter__(self):
    return _ChunksIterator(self._parent.__iter__())


class _ChunksIterator(grain.DatasetIterator):

  def __init__(self, parent):
    super().__init__(parent)
    self.before, self.chunks, self.next_chunk = None, [], 0

  def __next__(self):
    if self.next_chunk < len(self.chunks):
      return self._take()
    before = self._parent.get_state()
    element = next(self._parent)
    if "chunks" not in element:
      self.chunks, self.next_chunk = [], 0
      return element
    self.before, self.chunks, self.next_chunk = before, self._parts(element), 0
    return self._take()

  def _take(self):
    self.next_chunk += 1
    return self.chunks[self.next_chunk - 1]

  @staticmethod
  def _parts(element):
    return [{**c, "source": element["source"], "part": j} for j, c in enumerate(element["chunks"])]

  def get_state(self):
    if self.next_chunk < len(self.chunks):
      return {**self.before, "chunk": self.next_chunk}
    return self._parent.get_state()

  def set_state(self, state):
    state = dict(state)
    chunk = state.pop("chunk", None)
    self._parent.set_state(state)
    self.chunks, self.next_chunk = [], 0
    if chunk is not None:
      self.before = state
      self.chunks, self.next_chunk = self._parts(next(self._parent)), int(chunk)


# ------------------------------------------------------- skips and their rate

TOO_LONG = "too_long"
SKIP_REASONS = ("malformed_record", records.BAD_LATENT, records.EMPTY_IMAGE,
                records.UNDECODABLE_IMAGE,
                records.TRUNCATED_IMAGE, records.DECOMPRESSION_BOMB, records.MISSING_IMAGE,
                TOO_LONG, "other")
# Per source, the counts are: records read, skipped by reason (SKIP_REASONS), split into
# several documents (SPLIT, the last column; added after the reasons, so their columns keep
# their places).
SPLIT = 1 + len(SKIP_REASONS)
COUNT_WIDTH = SPLIT + 1


def check_error_rate(name, read, skipped, max_rate, min_records, details=None):
  """Raises UserError when a source's skipped fraction passes data.max_error_rate
  (once it has read data.error_min_records records)."""
  total = sum(skipped.values())
  if read < max(1, min_records) or total <= max_rate * read:
    return
  reason, n = max(skipped.items(), key=lambda kv: kv[1])
  detail = (details or {}).get(reason)
  raise UserError(
      f"data source {name!r}: {total} of {read} records skipped ({total / read:.0%} > "
      f"data.max_error_rate={max_rate:g}); most common reason: {reason} ({n})"
      + (f", e.g. {detail}" if detail else "")
      + ": fix or reconvert the source, or raise data.max_error_rate")


class _CountSkips(grain.IterDataset):
  """Drops skip markers, counting them by (source, reason); each document that
  passes carries the counts since the previous one as `stats`, a vector of
  num_sources x COUNT_WIDTH: records read, skips by reason, records split. A split
  record's chunks (`_Chunks`) count once: as read and split at their first.
  Raises (check_error_rate) when the records this iterator has read pass the
  error threshold, so an all-bad source stops instead of spinning."""

  def __init__(self, parent, names, max_rate, min_records):
    super().__init__(parent)
    self.names, self.max_rate, self.min_records = list(names), max_rate, min_records

  def __iter__(self):
    return _CountSkipsIterator(self._parent.__iter__(), self)


class _CountSkipsIterator(grain.DatasetIterator):

  def __init__(self, parent, ds):
    super().__init__(parent)
    self.ds = ds
    self.width = COUNT_WIDTH
    self.pending = np.zeros((len(ds.names), self.width), np.int32)
    self.totals = np.zeros((len(ds.names), self.width), np.int64)  # this worker's, for the check
    self.details = {}

  def __next__(self):
    while True:
      element = dict(next(self._parent))
      k, part = element.pop("source"), element.pop("part", None)
      if not part:  # a record, or the first chunk of a split one
        self.pending[k, 0] += 1
        self.totals[k, 0] += 1
      if part == 0:
        self.pending[k, SPLIT] += 1
        self.totals[k, SPLIT] += 1
      if "skip" not in element:
        stats, self.pending = self.pending.reshape(-1), np.zeros_like(self.pending)
        return {**element, "stats": stats}
      reason = element["skip"]
      r = SKIP_REASONS.index(reason) if reason in SKIP_REASONS else len(SKIP_REASONS) - 1
      self.pending[k, 1 + r] += 1
      self.totals[k, 1 + r] += 1
      self.details[SKIP_REASONS[r]] = element.get("detail") or reason
      check_error_rate(self.ds.names[k], int(self.totals[k, 0]),
                       dict(zip(SKIP_REASONS, self.totals[k, 1:SPLIT].tolist())),
                       self.ds.max_rate, self.ds.min_records, self.details)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


# The packer moves three arrays per document: the per-position ints stacked as
# columns, the patches and the pixels (packing cost grows with the number of features).
_INT_COLUMNS = ("tokens", "targets", "modality", "image_ids", "patch_index", "loss_mask",
                "encode")
_VECTORS = ("patches", "pixels")  # per-position vectors: [n, D] each


def _to_packed(encoded):
  """encode_document's arrays -> {"ints": [n, 7] int32, "patches": [n, D], "pixels": [n, P]}."""
  ints = np.stack([encoded[k].astype(np.int32, copy=False) for k in _INT_COLUMNS], axis=-1)
  return {"ints": ints, **{k: encoded[k] for k in _VECTORS}}


def unstack(element):
  """A document_stream element (or packed row) -> the per-position features
  of encode_document."""
  ints = element["ints"]
  out = {k: ints[..., j] for j, k in enumerate(_INT_COLUMNS)}
  out["loss_mask"] = out["loss_mask"].astype(np.float32)
  out.update({k: element[k] for k in _VECTORS})
  return out


def _collate(rows):
  """Packed rows -> one batch.

  The packer moves only the small int columns (tokens, ids, ...: 28 bytes a
  position); each document's patches and pixels ride along as lists and are
  written once, straight into the batch's [B, L, D] arrays (they are most of
  the bytes: packing and then stacking them would copy them twice). The
  rows' skip counts are summed into `data_stats`, their documents' (source, record id)
  listed in `data_origin` (a list per row)."""
  ints = np.stack([row["ints"] for row in rows])
  vectors = {}
  for k in _VECTORS:
    first = rows[0][k][0]
    vectors[k] = np.zeros(ints.shape[:2] + first.shape[-1:], first.dtype)
    for r, row in enumerate(rows):
      at = 0
      for p in row[k]:
        vectors[k][r, at:at + len(p)] = p
        at += len(p)
  out = unstack({"ints": ints, **vectors})
  out["segment_ids"] = np.stack([row["ints_segment_ids"] for row in rows])
  out["positions"] = np.stack([row["ints_positions"] for row in rows])
  out["data_stats"] = np.stack([np.sum(row["stats"], axis=0) for row in rows])
  out["data_origin"] = [np.asarray(row["origin"]).reshape(-1, 2) for row in rows]
  return out


# ------------------------------------------------------------------ dataset


def data_shards(cfg, process_count):
  """The data shards of a run: (shards, rows of each shard's part of a global batch).

  The global batch of data.batch_size rows is read from data.shards independent streams (0:
  one per process): shard k reads records k, k + shards, ... of every source's shuffled stream
  and packs rows [k * rows, (k + 1) * rows) of each batch; process i reads the shards
  [i * shards / P, (i + 1) * shards / P). A fixed data.shards makes the global batches, and a
  checkpoint's data state, the same for any process count that divides it."""
  shards = int(getattr(cfg.data, "shards", 0)) or process_count
  if shards < 0 or shards % process_count:
    raise UserError(
        f"data.shards={cfg.data.shards} does not divide over {process_count} processes: set it "
        f"to a multiple of {process_count} (or 0: one shard per process)")
  return shards, shard_rows(cfg, shards)


def shard_rows(cfg, shards):
  """Rows of each shard's part of a global batch."""
  global_batch = int(cfg.data.batch_size)
  if global_batch <= 0 or global_batch % shards:
    what = "data.shards" if int(getattr(cfg.data, "shards", 0)) else "one per process"
    raise UserError(
        f"data.batch_size {global_batch} is not a positive multiple of the {shards} data shards "
        f"({what}): set data.batch_size to a multiple of {shards}")
  return global_batch // shards


def local_shards(shards, process_index, process_count):
  """The data shards (of `shards`, data_shards') process `process_index` of `process_count` reads."""
  if not 0 <= process_index < process_count:
    raise UserError(f"process_index {process_index} is outside [0, {process_count})")
  per = shards // process_count
  return range(process_index * per, (process_index + 1) * per)


def make_dataset(cfg, *, shard=0, shards=1, source=None):
  """The Grain pipeline of one data shard: an IterDataset of its rows of each global batch.

  Per source of data.mixture (or the single custom `source`: any random-access
  sequence of documents): global shuffle (new each epoch), endless repeat, then
  this shard's slice of the stream (shard after repeat), then decode /
  bucket / tokenize (`_Load`). The sources are mixed by weight
  (`IterDataset.mix`), skips are counted (`_CountSkips`), documents are packed
  first-fit into rows of data.seq_len and batched. Batches carry
  `data_stats` ([rows, sources x COUNT_WIDTH] counts) that `DataIterator`
  takes out.
  """
  d = cfg.data
  rows = shard_rows(cfg, shards)
  if int(d.pack_bins) < 1:
    raise UserError(f"data.pack_bins is {d.pack_bins}: set it to 1 or more")
  seq_len = int(d.seq_len)
  tok = load_tokenizer(d.tokenizer)
  it = document_stream(cfg, shard=shard, shards=shards, source=source, tok=tok)
  it = grain.experimental.FirstFitPackIterDataset(
      it, length_struct={"ints": seq_len},
      num_packing_bins=int(d.pack_bins), seed=int(cfg.seed),
      padding_struct=_padding(tok.pad_id), meta_features=("stats", "origin") + _VECTORS,
      max_sequences_per_bin=int(getattr(d, "docs_per_row", 0)) or None)
  it = it.batch(rows, drop_remainder=True, batch_fn=_collate)
  if int(d.num_workers) > 0:
    _allow_unparsed_absl_flags()
    it = it.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=int(d.num_workers)))
  return it


def document_stream(cfg, *, shard=0, shards=1, source=None, tok=None):
  """One data shard's mixed stream of encoded documents (make_dataset before
  packing), with skip markers removed and counted (`stats`)."""
  d = cfg.data
  tok = load_tokenizer(d.tokenizer) if tok is None else tok
  patcher = image_grid(cfg, tok.model_vocab_size())
  sources = {"custom": (source, 1.0)} if source is not None else make_sources(cfg)
  streams, weights = {}, {}
  for k, (name, (src, weight)) in enumerate(sources.items()):
    ds = grain.MapDataset.source(src).map_with_index(_with_index)  # (record, its id)
    ds = shuffle(ds, [int(cfg.seed), k]).repeat(None)
    ds = ds.map_with_index(_with_position)[shard::shards]
    ds = ds.map(_Load(k, tok, patcher, d, int(cfg.seed)))
    streams[name] = _Chunks(ds.to_iter_dataset(
        grain.ReadOptions(num_threads=int(getattr(d, "read_threads", 2)), prefetch_buffer_size=32)))
    weights[name] = weight
  it = grain.IterDataset.mix(streams, weights)
  return _CountSkips(it, list(sources), float(getattr(d, "max_error_rate", 0.05)),
                     int(getattr(d, "error_min_records", 100)))


def _with_index(index, record):
  return record, index


def _with_position(position, element):
  """(record, record id) at `position` of the repeated stream -> (record, position, id)."""
  record, record_id = element
  return record, position, record_id


# Above this many records a source is shuffled by Grain's index_shuffle (no
# memory); below it by a numpy permutation per epoch (index_shuffle costs about
# 27 ms / num_records per record: 0.5 ms at 48 records, as much as decoding).
SMALL_SOURCE = 1 << 22


def shuffle(ds, seed):
  """A global shuffle of a MapDataset, reshuffled every epoch (for .repeat)."""
  if len(ds) > SMALL_SOURCE:
    return ds.seed(int(np.random.default_rng(seed).integers(1 << 31))).shuffle()
  return _EpochShuffle(ds, seed)


class _EpochShuffle(grain.MapDataset):
  """Index i of epoch e -> record perm_e[i], perm_e = permutation(seed, e)."""

  def __init__(self, parent, seed):
    super().__init__(parent)
    self._seed = list(seed)
    self._epoch, self._perm = None, None

  def __len__(self):
    return len(self._parent)

  def __str__(self):
    return "EpochShuffle"

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    n = len(self._parent)
    epoch, i = divmod(int(index), n)
    if epoch != self._epoch:
      self._perm = np.random.default_rng(self._seed + [epoch]).permutation(n)
      self._epoch = epoch
    return self._parent[int(self._perm[i])]


def _allow_unparsed_absl_flags():
  """Grain's worker pool reads absl flags; without absl.app they're unparsed.

  Marking them parsed keeps every default (google/grain#1355 workaround).
  """
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _padding(pad_id):
  """Packing fill values: pad id for tokens/targets, zeros elsewhere."""
  ints = np.zeros(len(_INT_COLUMNS), np.int32)
  ints[_INT_COLUMNS.index("tokens")] = ints[_INT_COLUMNS.index("targets")] = pad_id
  return {"ints": ints}


class DataIterator(grain.DatasetIterator):
  """The training loop's data: next() gives this process's rows of a global batch (BATCH_KEYS
  only), its data shards' parts in shard order (`data_shards`).

  Adds to the Grain iterators what a run needs: cumulative records read and
  skipped per source and reason (`metrics()`, and a UserError when a source's
  error rate passes data.max_error_rate), and a checkpoint state per data shard
  that records data.num_workers and the source names, so that a restore which
  would not continue the same stream fails with a clear message instead of
  silently reading other samples (Grain's multiprocess state depends on the
  worker count). A state holds the shards of one process; `set_state` takes the
  union of all processes' (unimm.train.checkpoint merges them), so a run can
  resume on another process count that divides the shards.
  """

  def __init__(self, datasets, names, cfg, shards):
    """datasets: {shard: make_dataset(...)} of this process; shards: the run's shard count."""
    self.shard_ids = sorted(datasets)
    super().__init__([datasets[k].__iter__() for k in self.shard_ids])
    self.shards = shards
    self.names = list(names)
    self.num_workers = int(cfg.data.num_workers)
    self.max_rate = float(getattr(cfg.data, "max_error_rate", 0.05))
    self.min_records = int(getattr(cfg.data, "error_min_records", 100))
    self.shard_counts = np.zeros((len(self.shard_ids), len(self.names), COUNT_WIDTH), np.int64)
    self.origins = []  # the last batch's documents: [source index, record id] each

  @property
  def counts(self):
    """[sources, COUNT_WIDTH]: records read, skipped by reason and split, over this process's
    shards."""
    return self.shard_counts.sum(0)

  def __next__(self):
    parts = [dict(next(it)) for it in self._parents]
    self.origins = []
    for j, part in enumerate(parts):
      stats = np.asarray(part.pop("data_stats"))
      self.shard_counts[j] += stats.reshape(-1, *self.shard_counts.shape[1:]).sum(0)
      self.origins += [o for row in part.pop("data_origin") for o in np.asarray(row).tolist()]
    counts = self.counts
    for k, name in enumerate(self.names):
      check_error_rate(name, int(counts[k, 0]),
                       dict(zip(SKIP_REASONS, counts[k, 1:SPLIT].tolist())),
                       self.max_rate, self.min_records)
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def describe_origins(self, origins=None):
    """'shapes records 3, 17; pairs record 9': the sources and record ids of a batch's
    documents (default: the last batch's, this process's rows)."""
    by_source = {}
    for k, record in self.origins if origins is None else origins:
      by_source.setdefault(self.names[k], []).append(record)
    return "; ".join(f"{name} record{'s' if len(ids) > 1 else ''} "
                     f"{', '.join(map(str, sorted(set(ids))))}" for name, ids in by_source.items())

  def metrics(self, counts=None):
    """{"data/read/<source>": n, "data/skipped/<source>/<reason>": n, "data/split/<source>": n
    (both n > 0)} of `counts` (default: this process's; the loop passes the sum over
    processes). A split record counts once in read, and its chunks are trained on."""
    counts = self.counts if counts is None else counts
    out = {}
    for k, name in enumerate(self.names):
      out[f"data/read/{name}"] = int(counts[k, 0])
      for r, reason in enumerate(SKIP_REASONS):
        if counts[k, 1 + r]:
          out[f"data/skipped/{name}/{reason}"] = int(counts[k, 1 + r])
      if counts[k, SPLIT]:
        out[f"data/split/{name}"] = int(counts[k, SPLIT])
    return out

  def get_state(self):
    return {"num_workers": self.num_workers, "sources": self.names, "shards": self.shards,
            "shard_states": {str(k): {"stream": it.get_state(), "counts": c.tolist()}
                             for k, it, c in zip(self.shard_ids, self._parents, self.shard_counts)}}

  def set_state(self, state):
    if "shard_states" not in state:
      raise UserError("the checkpoint's data state predates this version of unimm: start a "
                      "new workdir")
    saved = int(state["num_workers"])
    if saved != self.num_workers:
      raise UserError(
          f"the checkpoint's data stream was saved with data.num_workers={saved} but this run "
          f"has {self.num_workers}; Grain's multiprocess state depends on the worker count, so "
          f"resume with --config.data.num_workers={saved} to read exactly the samples of an "
          "uninterrupted run")
    if list(state["sources"]) != self.names:
      raise UserError(
          f"the checkpoint's data stream mixes sources {state['sources']} but data.mixture "
          f"now gives {self.names}: resume with the same data.mixture")
    if int(state["shards"]) != self.shards:
      raise UserError(
          f"the checkpoint's data stream was read as {state['shards']} data shards and this run "
          f"reads {self.shards}: resume with --config.data.shards={state['shards']} (on a process "
          "count that divides it) to read exactly the samples of an uninterrupted run")
    missing = [k for k in self.shard_ids if str(k) not in state["shard_states"]]
    if missing:
      raise UserError(f"the checkpoint's data state lacks data shard {missing[0]} of "
                      f"{self.shards}: it is incomplete (a save cut short?)")
    for j, (k, it) in enumerate(zip(self.shard_ids, self._parents)):
      shard = state["shard_states"][str(k)]
      it.set_state(shard["stream"])
      self.shard_counts[j] = _restore_counts(shard["counts"], len(self.names))

  def start_prefetch(self):
    for it in self._parents:
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()

  def close(self):
    for it in self._parents:
      if hasattr(it, "close"):
        it.close()


def _restore_counts(saved, sources):
  """A checkpoint's counts -> [sources, COUNT_WIDTH]; counts saved before the split column
  existed ([sources, SPLIT]) restore with no records split."""
  counts = np.asarray(saved, np.int64)
  if counts.ndim == 2 and counts.shape == (sources, SPLIT):
    counts = np.concatenate([counts, np.zeros((sources, COUNT_WIDTH - SPLIT), np.int64)], 1)
  if counts.shape != (sources, COUNT_WIDTH):
    raise UserError(f"the checkpoint's data counts have shape {list(counts.shape)}, this version "
                    f"of unimm keeps [{sources}, {COUNT_WIDTH}] (sources x read, skip reasons, "
                    "split): start a new workdir")
  return counts


def make_iterator(cfg, *, process_index=0, process_count=1, source=None):
  """A DataIterator over this process's data shards: get_state()/set_state() resume exactly."""
  shards, _ = data_shards(cfg, process_count)
  datasets = {k: make_dataset(cfg, shard=k, shards=shards, source=source)
              for k in local_shards(shards, process_index, process_count)}
  names = (["custom"] if source is not None
           else [name for name, _, _ in parse_mixture(getattr(cfg.data, "mixture", "shapes"))])
  return DataIterator(datasets, names, cfg, shards)


# --------------------------------------------------------------- validation


def validate_batch(batch, *, seq_len, patch_dim, batch_size, pixel_dim=0):
  """Raises a one-line UserError if batch breaks the batch contract (pixel_dim: the image
  grid's, 0 for pixel patches)."""
  if not hasattr(batch, "keys"):
    raise UserError(
        f"a batch must be a dict of arrays with keys {list(BATCH_KEYS)}, got "
        f"{type(batch).__name__}")
  missing = [k for k in BATCH_KEYS if k not in batch]
  if missing:
    raise UserError(
        f"batch is missing keys {missing}: a batch needs {list(BATCH_KEYS)} "
        "(see unimm.data.pipeline)")
  dims = {"patches": ("patch_dim", patch_dim), "pixels": ("pixel_dim", pixel_dim)}
  for k in BATCH_KEYS:
    x = batch[k]
    want = (batch_size, seq_len) + ((dims[k][1],) if BATCH_NDIM[k] == 3 else ())
    shape = tuple(getattr(x, "shape", ()))
    if k == "patches" and shape[:2] == want[:2] and len(shape) == 3:
      if shape[2] != patch_dim:
        raise UserError(_patch_dim_message(shape[2], patch_dim, batch))
    if shape != want:
      raise UserError(
          f"batch[{k!r}] has shape {shape}, expected {want} "
          "(data.batch_size per process, data.seq_len"
          f"{', ' + dims[k][0] if BATCH_NDIM[k] == 3 else ''})")
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
