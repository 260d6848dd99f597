"""MetaQuery on Shapes: the demo's unified model, frozen, reads each prompt followed by 16
learnable queries (in the place of the image to generate); the queries' last hidden states go
through a trainable connector (2 bidirectional blocks) into an MMDiT that draws the image. Only
the queries, the connector and the MMDiT train; the language model keeps its parameters, and so
its captions and answers (ShapesEval reports them from the same checkpoint).

    make demo                                                    # trains runs/demo
    python -m unimm.train --config configs/metaquery_shapes.py --workdir runs/metaquery_shapes

model.condition.encoder="llm" conditions on the LLM's hidden states of the prompt instead
(Qwen-Image style: the frozen LLM as the text encoder).
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), "mmdit_shapes.py"))
  c.model.condition.update(encoder="metaquery", llm="runs/demo", depth=2, text_len=0)
  # the frozen LLM's tokenizer, patches and row length (the demo's)
  c.data.update(tokenizer="byte", seq_len=96)
  c.model.patch_size = 8
  c.model.mmdit.update(edit="none")
  c.model.edit_source = "none"  # text to image only
  c.data.tasks = dict(t2i=1.0)
  c.data.image_dropout = 0.0
  return c
