"""An MMDiT (FLUX layout: double- then single-stream blocks, 3-axis RoPE) trained from scratch on
Shapes text-to-image and edits, on 32x32 pixels in 4x4 patches (64 image tokens), with a small
trainable text encoder over word tokens; edits by InstructPix2Pix-style channel concatenation of
the source, the x0 prediction of an edit target relative to that source
(model.edit_source="residual").

    python -m unimm.train --config configs/mmdit_shapes.py --workdir runs/mmdit_shapes

One document per row (160 positions: the source's and the target's 64 tokens and the text; the
rare longer document is skipped and counted); the text stream holds a row's first 24 text tokens
(model.condition.text_len: the longest Shapes text is 15 words; a longer one is cut and counted
as text_cut). 16 rows a step, 55% of them edits. Condition dropout trains the three branches of
two-scale guidance (text 10%, source image 10%, independently). model.mmdit.edit="kontext"
appends the source to the image stream instead (RoPE frame 1).

t is shifted toward noise (flow.shift=8: the median t 0.5 becomes 0.89), for training and the
sampler's schedule alike: what an edit changes is decided near t = 1, which logit-normal t
rarely visits unshifted (edits exactly right 0.111 unshifted, 0.556 with shift 8 over 8x8
patches; README). 30% of the draws stay unshifted (flow.unshifted_prob), so that the model also
learns to read the shape off x_t at small t, with an x0 error's weight 1/t^2 capped at 4
(flow.max_weight; uncapped it reaches 400 at t = 0.05, and the same mixture without the cap, over
8x8 patches, blurred every sample). Shifted only, every circle came out a rounded square (shape
0.667). Sampling: text guidance 2, no image guidance.
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(family="mmdit", width=128, depth=2, heads=4, head_dim=32, qkv_bias=True,
                 qk_norm=True, patch_size=4, prediction="x0", edit_source="residual")
  c.model.mmdit.update(variant="flux", single_depth=2, axes_dims=(8, 12, 12), pooled_dim=128,
                       edit="concat")
  c.model.condition.update(encoder="text", depth=1, text_len=24)
  # the text encoder reads word tokens (one id a word of the Shapes texts, as a BPE vocabulary
  # gives common words): edits exactly right 0.611 / objects 0.712 against 0.556 / 0.692 over bytes
  c.data.update(image_size=32, seq_len=160, batch_size=16, docs_per_row=1, cfg_dropout=0.1,
                image_dropout=0.1, two_object_prob=0.3, tokenizer="shapes")
  c.data.tasks = dict(t2i=0.45, edit=0.55)
  c.flow.update(shift=8.0, unshifted_prob=0.3, max_weight=4.0)
  c.optim.update(lr=2e-3, warmup_steps=100)
  c.train.update(steps=2400, log_every=100, ckpt_every=600, time_limit_s=780.0)
  c.sample.update(steps=25, cfg_scale=2.0, image_cfg_scale=1.0)
  return c
