"""X-Omni on Shapes: images as discrete VQ codes generated autoregressively by the unified
model (early fusion: one vocabulary of text ids and codes, next-token prediction over both),
rendered into pixels by the tokenizer's decoder; then reinforcement learning: GRPO with
ShapesEval's image parser as the reward (`unimm.train.grpo`: a group of samples per prompt,
advantages normalised within the group, KL to the supervised checkpoint).

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes
    python -m unimm.train --config configs/x_omni_shapes.py --workdir runs/x_omni
    python -m unimm.train.grpo --init runs/x_omni --workdir runs/x_omni_grpo

The supervised stage is `early_fusion_shapes` with fewer steps, so that the RL stage has
something left to win on text to image.
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "early_fusion_shapes.py"))
  c.train.update(steps=900, time_limit_s=330.0)
  # no edit bar here: the early-fusion edit share goes to captions, learned in these 900 steps
  c.data.tasks.update(t2i=0.45, caption=0.3, qa=0.15, edit=0.05, story=0.05)
  # rollouts at the sampling temperature of the eval (the policy is the code softmax at 0.7)
  c.grpo.update(prompts=8, group=8, lr=3e-4, kl_weight=0.04, temperature=0.7, time_limit_s=540.0)
  return c
