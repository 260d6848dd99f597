"""SmartEdit on Shapes: a frozen unified model (the demo) reads the whole edit document, the
source image and the instruction, followed by 16 learnable queries; their last hidden states
go through a trainable connector into the MMDiT (MetaQuery's path: the LLM understands the
instruction against the source), and the source image's patches reach the MMDiT on a second
path, concatenated to the target's channels with the x0 prediction relative to them
(InstructPix2Pix-style, as in `mmdit_shapes`). Trained on Shapes text-to-image and edits
(converted InstructPix2Pix / HQ-Edit folders join through data.mixture).

    make demo                                                    # trains runs/demo
    python -m unimm.train --config configs/smartedit_shapes.py --workdir runs/smartedit
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmdit_shapes.py"))
  c.model.condition.update(encoder="metaquery", llm="runs/demo", depth=2, text_len=0)
  # the frozen LLM's tokenizer, patches and row length (the demo's)
  c.data.update(tokenizer="byte", seq_len=96)
  c.model.patch_size = 8
  return c
