"""X-Omni's diffusion decoder on 32x32 Shapes: an MMDiT (FLUX layout, `mmdit_shapes`' size) whose
text stream is the target image's 64 codes by the frozen VQ tokenizer (model.condition.encoder
="vq": the code table and 2 bidirectional blocks, raster order), trained by flow matching to
render the image the codes describe. `x_omni_shapes` then renders the codes its LLM generates
through it (model.image_decoder) instead of the tokenizer's own decoder.

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes
    python -m unimm.train --config configs/x_omni_decoder_shapes.py --workdir runs/x_omni_decoder

Its eval scores ShapesEval's text to image with the codes of the true image as the prompt (the
round trip image -> codes -> MMDiT). As `mmdit_shapes`: 4x4 patches, t shifted toward noise
(flow.shift=8) with 30% of the draws unshifted and the x0 weight capped at 4 (flow.max_weight).
Measured 2026-12-01 on the 2-core CPU: 1200 steps in 9 min 38 s, round trip colour 1.000,
shape 0.907, position 1.000 (over 8x8 patches, shift 4 only: circles came out rounded squares,
shape 0.852).
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "seed_tokenizer_shapes.py"))  # the MMDiT
  c.model.condition.update(encoder="vq", tokenizer="runs/vq_shapes", depth=2, recon_weight=0.0)
  c.model.patch_size = 4
  c.data.seq_len = 144  # 64 patches, 64 codes and the two-object texts' markers
  c.flow.update(shift=8.0, unshifted_prob=0.3, max_weight=4.0)
  c.train.update(steps=1200, time_limit_s=660.0)
  return c
