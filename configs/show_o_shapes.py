"""Show-o on the unified spine: one transformer, causal over text and bidirectional inside each
image, trained by next-token prediction on text and masked-token (discrete diffusion) prediction
on the VQ codes of its target images in the same sequence, understanding reading the same codes;
images sampled by confidence-based unmasking within their text context, text autoregressively.
This is MaskGIT's objective in a unified sequence: the recipe is `maskgit_shapes` (the VQ
tokenizer, `image_loss="masked"`, the MaskGIT sampler) with Show-o's settings: more captions
and QA than the demo's (Show-o trains understanding and generation in every batch), 12
decoding steps and guidance 1.5 in Show-o's (1 + w) l_c - w l_u form (our scale 2.5).

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes
    python -m unimm.train --config configs/show_o_shapes.py --workdir runs/show_o
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "maskgit_shapes.py"))
  c.data.tasks.update(t2i=0.4, caption=0.25, qa=0.15, edit=0.15, story=0.05)
  c.sample.update(mask_steps=12, cfg_scale=2.5)
  return c
