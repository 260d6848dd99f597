"""FUDOKI on the unified spine: MMaDA's recipe (`mmada_shapes`: bidirectional documents, VQ
codes by masked prediction, word tokens, answers padded to data.answer_len) with text trained
by discrete flow matching on a metric-induced probability path instead of masking: each answer
token is replaced by a draw of p_t(x | x1) ~ exp(-beta(t) d(x, x1)), d the cosine distance of
the token embeddings (t = 1 uniform over the text vocabulary, t -> 0 the clean token), and the
model predicts the clean token at every answer position. Captions are sampled from a uniform
block by predicting x1 and drawing the block anew from the path at a lower t, sample.text_steps
times.

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes
    python -m unimm.train --config configs/fudoki_shapes.py --workdir runs/fudoki
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "mmada_shapes.py"))
  c.model.text_loss = "flow"
  return c
