"""The batch contract between the data pipeline and the model: what a training batch holds.

Both sides import this module (and nothing of each other): the pipeline emits these
arrays, models, losses and the train step read them.

A batch is a dict of `BATCH_KEYS`, each [B, L] (patches, pixels: [B, L, D]) over packed rows of
L positions. A row holds several documents (segments) one after another, each
contiguous, then padding (segment 0):

  tokens       int32   token id (text, special tokens, vq image codes)
  targets      int32   next-token target of each position
  loss_mask    float32 1 where the next-token loss applies
  patches      float32 image patch vectors (pixels in [-1, 1] or tokenizer latents); 0 at text
  modality     int32   TEXT, CLEAN_IMAGE (given as context) or NOISED_IMAGE (generated)
  image_ids    int32   image instance within its document, 1-based; 0 at text
  patch_index  int32   position of the patch in the image's patch grid (row * max_cols + col)
  pixels       uint8   [B, L, P] pixels of the image tokens the train step encodes (vae / vq):
                       each token's p x p x 3 footprint (`unimm.image_grid`); 0 elsewhere
  encode       int32   1 at those tokens: the step's frozen tokenizer writes their `patches`
                       (vae latents) or `tokens` and the `targets` before them (vq codes)
  segment_ids  int32   document within the row, 1-based; 0 at padding
  positions    int32   position within the document (0 at padding)

Within a row each segment's positions are contiguous and increasing, and each image's
positions are contiguous: the flash attention kernels rely on it to skip tiles. An image
to encode is all grid**2 tokens of a square image, in order.
"""

import numpy as np

TEXT, CLEAN_IMAGE, NOISED_IMAGE = 0, 1, 2

# Per-position features of one encoded document (packed to the row length).
FEATURES = ("tokens", "targets", "loss_mask", "patches", "modality", "image_ids", "patch_index",
            "pixels", "encode")
BATCH_KEYS = FEATURES + ("segment_ids", "positions")
BATCH_DTYPES = {k: np.int32 for k in BATCH_KEYS} | {"loss_mask": np.float32, "patches": np.float32,
                                                    "pixels": np.uint8}
BATCH_NDIM = {k: 3 if k in ("patches", "pixels") else 2 for k in BATCH_KEYS}
