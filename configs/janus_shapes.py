"""Janus-Pro-style decoupled visual encoding on the unified spine: images to understand
(captioning, questions, edit sources) enter as 8x8 pixel patches through a small
bidirectional ViT (model.vit_depth blocks) into the language model; images to generate
are the VQ tokenizer's codes, predicted token by token (as early fusion).

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes
    python -m unimm.train --config configs/janus_shapes.py --workdir runs/janus
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "early_fusion_shapes.py"))
  c.model.update(understanding="pixels", patch_size=8, vit_depth=2)
  return c
