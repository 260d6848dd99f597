"""SEED-LLaMA on Shapes: the unified model generates and reads the 16 codes of the query
tokenizer of `seed_tokenizer_shapes` (ViT, causal Q-Former, FSQ) in their left-to-right order,
as early fusion does VQ codes (one vocabulary, next-token prediction over text and codes); the
tokenizer's MMDiT renders generated codes into pixels.

    python -m unimm.train --config configs/seed_tokenizer_shapes.py --workdir runs/seed_tokenizer
    python -m unimm.train --config configs/seed_llama_shapes.py --workdir runs/seed_llama

Measured 2026-12-01 on the 2-core CPU: 1800 steps in 9 min 45 s, t2i colour 0.889, shape 0.685,
position 1.000, captions 1.000, QA 0.792.
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "early_fusion_shapes.py"))
  c.model.update(image_tokenizer="seed", tokenizer_path="runs/seed_tokenizer")
  return c
