"""BAGEL's shape, scaled down to the demo: a mixture of transformers in which text and
condition images use the understanding expert and generated images the generation
expert (own norms, QKV/O projections and FFN), all tokens sharing one attention.

    python -m unimm.train --config configs/mot.py --workdir runs/mot

As BAGEL, the generation expert starts as a copy of the understanding expert (a
pretrained LLM there; set model.init_from to a local Qwen2.5 / Qwen3 directory to start
from one, and model.mot.freeze_text=True to train only the image side as LMFusion).
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "demo.py"))
  c.model.mot.update(route=(0, 0, 1), init_copy=True)
  c.train.time_limit_s = 780.0
  c.flow.update(unshifted_prob=0.0, max_weight=0.0)  # as measured (before the demo's t mixture)
  return c
