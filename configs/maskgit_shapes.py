"""MaskGIT on the unified spine: Shapes images as the VQ tokenizer's codes, target images
trained by masked-token prediction (a cos(pi/2 u) share of each image's codes masked,
loss on the masked codes only), text by next-token prediction; sampled by confidence-based
parallel decoding with classifier-free guidance on the logits.

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes
    python -m unimm.train --config configs/maskgit_shapes.py --workdir runs/maskgit
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "demo.py"))  # model, data, optim, steps
  c.model.update(image_tokenizer="vq", tokenizer_path="runs/vq_shapes", image_loss="masked")
  c.sample.update(cfg_scale=3.0, mask_steps=12, image_temperature=1.0)
  return c
