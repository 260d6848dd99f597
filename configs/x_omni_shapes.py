"""X-Omni on Shapes: images as discrete VQ codes generated autoregressively by the unified
model (early fusion: one vocabulary of text ids and codes, next-token prediction over both),
rendered into pixels by a diffusion decoder (an MMDiT conditioned on the codes,
`x_omni_decoder_shapes`; model.image_decoder); then reinforcement learning: GRPO with
ShapesEval's image parser as the reward (`unimm.train.grpo`: a group of samples per prompt,
advantages normalised within the group, KL to the supervised checkpoint).

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq_shapes
    python -m unimm.train --config configs/x_omni_decoder_shapes.py --workdir runs/x_omni_decoder
    python -m unimm.train --config configs/x_omni_shapes.py --workdir runs/x_omni
    python -m unimm.train.grpo --init runs/x_omni --workdir runs/x_omni_grpo

Measured 2026-12-01 (2-core CPU; tokenizer 44.5 dB, decoder 1200 steps of 4x4 patches, round
trip 0.907): 900 steps in 5 min 16 s, t2i colour 1.000, shape 0.796, position 0.981, captions
1.000 (rendered by the tokenizer's own decoder instead, --config.model.image_decoder='': shape
0.981).

GRPO over it (16 prompts x 8 samples an iteration, rewarded off the VQ decoder's images, the
output head trained alone at lr 1e-3; 134 iterations in 9 min): text to image as the policy
samples (temperature 1, no guidance, as the rollouts draw; every one-object scene twice;
`eval_policy.json`) all three right 0.633 -> 0.744, KL 0.018 a code; at the recipe's sampling
(temperature 0.7, guidance 1.5) 0.796 -> 0.815. Every parameter trained at lr 2e-4 won less in
the same time (0.630 -> 0.682): its iterations are slower and noisier (README).
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "early_fusion_shapes.py"))
  c.model.image_decoder = "runs/x_omni_decoder"
  c.train.update(steps=900, time_limit_s=330.0)
  # no edit bar here: the early-fusion edit share goes to captions, learned in these 900 steps
  c.data.tasks.update(t2i=0.45, caption=0.3, qa=0.15, edit=0.05, story=0.05)
  # 16 prompts x 8 rewarded off the VQ decoder, the output head (and final norm) trained alone
  c.grpo.update(prompts=16, group=8, lr=1e-3, top_blocks=0, kl_weight=0.04, reward_render="vq",
                time_limit_s=540.0)
  return c
