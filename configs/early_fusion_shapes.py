"""Chameleon / Emu3-style early fusion on the unified spine: one vocabulary of text ids and
the VQ tokenizer's image codes (`<boi>` codes `<eoi>` inline with the text), next-token
prediction over both, nothing else; images sampled code by code with classifier-free
guidance on the logits.

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes
    python -m unimm.train --config configs/early_fusion_shapes.py --workdir runs/early_fusion
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "demo.py"))  # model, data, optim, steps
  c.model.update(image_tokenizer="vq", tokenizer_path="runs/vq_shapes", image_loss="next_token")
  # Guidance helps little here and hurts when strong: on this recipe's checkpoint, t2i colour
  # was 1.0 at guidance 1 or 1.5 (temperature 0.7), 0.98 at 2, 0.48 at 3, 0.24 at 6.
  c.sample.update(cfg_scale=1.5, image_temperature=0.7)
  return c
