"""The unified attention mask, from per-token ids: the dense reference and what flash
kernels need to build it tile by tile (never as [L, L]).

Per token (`MaskIds`, each [B, L] int32): segment (packed document, 1-based; 0 = padding),
modality (TEXT / CLEAN_IMAGE / NOISED_IMAGE), image (instance within the document, 1-based;
0 = text) and position (within the document). Query i may attend key j iff

    same segment  and  (pos_j <= pos_i  or  same image)  and  not (j is noised and not same image)

with same image = same segment, equal image ids, image > 0: causal over text, bidirectional
inside each image, nothing across documents, and a noised (generated) image visible only to
itself. Padding is segment 0 with positions 0: it sees all padding and nothing else. Tokens
of a segment at one position see each other: a document whose tokens all take position 0 in
the mask is bidirectional (text diffusion, model.text_loss="masked"), its noised images still
hidden from the rest.

Kernels see two int32 columns per token (`pack`): `code = segment << 15 | image << 1 | noised`
and `pos`; `tile_mask` rebuilds any tile's mask from them. Rows follow the batch contract
(`unimm.batch`): each segment and each image is contiguous, positions never decrease within a
segment. Then the keys a query can see lie in one index interval, and so do the queries that
can see a key, which gives per block the range of tiles to visit (`block_ranges`), and a tile
whose pairs are all allowed needs no mask at all (`full_tiles`).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from unimm.batch import NOISED_IMAGE

SEGMENT_SHIFT, IMAGE_SHIFT = 15, 1
MAX_SEGMENT, MAX_IMAGE = 1 << 16, 1 << 14


class MaskIds(NamedTuple):
  """What the attention mask is made of, per token ([B, L] int32 each)."""
  segment: jax.Array   # packed sample, 1-based; 0 = padding / empty cache slot
  modality: jax.Array  # TEXT, CLEAN_IMAGE or NOISED_IMAGE
  image: jax.Array     # image instance within the sample, 1-based; 0 = text
  position: jax.Array  # position within the sample


def attention_mask(q: MaskIds, kv: MaskIds):
  """[B, Lq, Lk] bool, the dense reference (the XLA attention path)."""
  same_seg = q.segment[:, :, None] == kv.segment[:, None, :]
  same_img = same_seg & (q.image[:, :, None] == kv.image[:, None, :]) & (kv.image[:, None, :] > 0)
  causal = kv.position[:, None, :] <= q.position[:, :, None]
  noised_key = (kv.modality == NOISED_IMAGE)[:, None, :]
  return same_seg & (causal | same_img) & ~(noised_key & ~same_img)


def pack(ids: MaskIds):
  """(code, pos) [B, L] int32: segment << 15 | image << 1 | noised, and the position.
  Segments must be < 2^16 and image ids < 2^14 (a row of L tokens has at most L of each)."""
  noised = (ids.modality == NOISED_IMAGE).astype(jnp.int32)
  code = (ids.segment.astype(jnp.int32) << SEGMENT_SHIFT) | (ids.image.astype(jnp.int32) << IMAGE_SHIFT)
  return code | noised, ids.position.astype(jnp.int32)


def tile_mask(q_code, q_pos, k_code, k_pos):
  """The mask of a tile from packed ids: q_* [bq] (or [bq, 1]), k_* [bk] (or [1, bk]) ->
  bool [bq, bk]. Plain jnp on the two blocks, so it runs inside Pallas kernels (Triton and
  Mosaic) as well as outside."""
  if q_code.ndim == 1:
    q_code, q_pos = q_code[:, None], q_pos[:, None]
  if k_code.ndim == 1:
    k_code, k_pos = k_code[None, :], k_pos[None, :]
  same_seg = (q_code >> SEGMENT_SHIFT) == (k_code >> SEGMENT_SHIFT)
  same_img = ((q_code >> IMAGE_SHIFT) == (k_code >> IMAGE_SHIFT)) & (
      ((k_code >> IMAGE_SHIFT) & (MAX_IMAGE - 1)) > 0)  # same segment and image, image > 0
  noised_key = (k_code & 1) == 1
  causal = k_pos <= q_pos
  return same_seg & (causal | same_img) & ~(noised_key & ~same_img)


def run_bounds(key, *more):
  """For [B, L] ids constant over contiguous runs: (first, last) index of each token's run
  (with `more` ids, a run is where all of them stay constant)."""
  b, l = key.shape
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  change = key[:, 1:] != key[:, :-1]
  for k in more:
    change = change | (k[:, 1:] != k[:, :-1])
  starts = jnp.concatenate([jnp.ones((b, 1), bool), change], axis=1)
  ends = jnp.concatenate([change, jnp.ones((b, 1), bool)], axis=1)
  first = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
  last = jax.lax.cummin(jnp.where(ends, idx, l - 1), axis=1, reverse=True)
  return first, last


def aligned_source(segment, modality, image):
  """For editing (InstructPix2Pix-style alignment): per token, the index of the token at the
  same place of the last condition image before it in its document, and whether that is
  usable: [B, L] int32, [B, L] bool, True only at noised-image tokens whose source image has
  the same number of tokens (an image of another size is never used misaligned)."""
  from unimm.batch import CLEAN_IMAGE  # pylint: disable=import-outside-toplevel
  b, l = segment.shape
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (b, l))
  first, last = run_bounds(jnp.where(image > 0, segment * MAX_IMAGE + image, -1 - idx))
  clean_start = (modality == CLEAN_IMAGE) & (image > 0) & (idx == first)
  src_first = jax.lax.cummax(jnp.where(clean_start, idx, -1), axis=1)
  at = jnp.maximum(src_first, 0)
  take = lambda x: jnp.take_along_axis(x, at, axis=1)
  src = jnp.clip(src_first + idx - first, 0, l - 1)
  ok = ((modality == NOISED_IMAGE) & (image > 0) & (src_first >= 0) & (take(segment) == segment)
        & (take(last) - src_first == last - first))
  return src, ok


def token_ranges(ids: MaskIds):
  """Per token, inclusive index intervals ([B, L] int32 each) of self-attention over one row:
  (kv_lo, kv_hi): every key token i may see lies in [kv_lo_i, kv_hi_i];
  (q_lo, q_hi):   every query that may see key j lies in [q_lo_j, q_hi_j]."""
  l = ids.segment.shape[1]
  idx = jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), ids.segment.shape)
  seg_first, seg_last = run_bounds(ids.segment)
  in_image = ids.image > 0
  image_key = jnp.where(in_image, ids.segment * MAX_IMAGE + ids.image, -1 - idx)  # text: unique
  img_first, img_last = run_bounds(image_key)
  pos_first, pos_last = run_bounds(ids.segment, ids.position)  # tokens at one position see each other
  padding = ids.segment == 0
  noised = ids.modality == NOISED_IMAGE
  kv_lo = seg_first
  kv_hi = jnp.where(padding, seg_last,
                    jnp.maximum(pos_last, jnp.where(in_image, jnp.maximum(idx, img_last), idx)))
  q_lo = jnp.where(padding, seg_first,
                   jnp.minimum(pos_first, jnp.where(in_image, jnp.minimum(idx, img_first), idx)))
  q_hi = jnp.where(noised & in_image, img_last, seg_last)
  return (kv_lo, kv_hi), (q_lo, q_hi)


def block_ranges(ids: MaskIds, block_q: int, block_k: int):
  """Tiles to visit, as inclusive block-index intervals ([B, n] int32 each):
  (kv_lo, kv_hi) [B, L/block_q]: the key blocks query block i must visit;
  (q_lo, q_hi)   [B, L/block_k]: the query blocks that must visit key block j.
  Tiles outside these intervals are fully masked."""
  b, l = ids.segment.shape
  if l % block_q or l % block_k:
    raise ValueError(f"sequence length {l} is not a multiple of the blocks ({block_q}, {block_k})")
  (kv_lo, kv_hi), (q_lo, q_hi) = token_ranges(ids)
  by = lambda x, n: x.reshape(b, l // n, n)
  kv = (jnp.min(by(kv_lo, block_q), -1) // block_k, jnp.max(by(kv_hi, block_q), -1) // block_k)
  q = (jnp.min(by(q_lo, block_k), -1) // block_q, jnp.max(by(q_hi, block_k), -1) // block_q)
  return kv, q


def full_tiles(ids: MaskIds, block_q: int, block_k: int):
  """bool [B, L/block_q, L/block_k]: tiles whose every pair is allowed (no mask needed): all
  their tokens in one segment, and either every key at or before every query with no noised
  key, or every token in one image. Conservative (a False may still be full); from per-block
  summaries, never [L, L]."""
  b, l = ids.segment.shape

  def summary(n):
    r = lambda x: x.reshape(b, l // n, n)
    seg, img, pos = r(ids.segment), r(ids.image), r(ids.position)
    return dict(seg_min=seg.min(-1), seg_max=seg.max(-1), img_min=img.min(-1), img_max=img.max(-1),
                pos_min=pos.min(-1), pos_max=pos.max(-1),
                noised=jnp.any(r(ids.modality) == NOISED_IMAGE, -1))

  q, k = summary(block_q), summary(block_k)
  qq = {n: v[:, :, None] for n, v in q.items()}
  kk = {n: v[:, None, :] for n, v in k.items()}
  one_seg = ((qq["seg_min"] == qq["seg_max"]) & (kk["seg_min"] == kk["seg_max"])
             & (qq["seg_min"] == kk["seg_min"]))
  causal = (kk["pos_max"] <= qq["pos_min"]) & ~kk["noised"]
  one_img = ((qq["img_min"] == qq["img_max"]) & (kk["img_min"] == kk["img_max"])
             & (qq["img_min"] == kk["img_min"]) & (qq["img_min"] > 0))
  return one_seg & (causal | one_img)


def reference_attention(q, k, v, q_ids: MaskIds, kv_ids: MaskIds):
  """Masked softmax attention, float32 scores, the dense mask: q [B, Lq, H, D], k / v
  [B, Lk, KV, D] (H a multiple of KV: grouped-query heads) -> [B, Lq, H, D]. The XLA path of
  `layers.attention` and the reference of the kernels' tests."""
  heads = q.shape[2]
  if k.shape[2] != heads:
    k = jnp.repeat(k, heads // k.shape[2], axis=2)
    v = jnp.repeat(v, heads // v.shape[2], axis=2)
  mask = attention_mask(q_ids, kv_ids)
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  scores = jnp.where(mask[:, None], scores, -1e30)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", probs, v)
