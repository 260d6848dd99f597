"""An MMDiT (FLUX layout: double- then single-stream blocks, 3-axis RoPE) trained from scratch on
Shapes text-to-image and edits, on 32x32 pixels in 8x8 patches (16 image tokens), with a small
trainable text encoder; edits by InstructPix2Pix-style channel concatenation of the source, the
x0 prediction of an edit target relative to that source (model.edit_source="residual").

    python -m unimm.train --config configs/mmdit_shapes.py --workdir runs/mmdit_shapes

One document per row (96 positions: the text stream holds the document's text and special
tokens, at most 80, the image stream the target's 16 tokens; the rare longer document is
skipped and counted), 16 rows a step, 55% of them edits. Condition dropout trains the
three branches of two-scale guidance (text 10%, source image 10%, independently).
model.mmdit.edit="kontext" appends the source to the image stream instead (RoPE frame 1).

t is shifted toward noise (flow.shift=8: the median t 0.5 becomes 0.89), for training and the
sampler's schedule alike. An 8x8 patch holds 192 values of a flat colour, so even at t = 0.7 the
noised target still shows its colours and places; what an edit changes is decided near t = 1,
which logit-normal t rarely visits unshifted (edits exactly right 0.111 unshifted, 0.417 with
shift 4, 0.556 with 8; README). Sampling: text guidance 2, no image guidance (measured best).
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(family="mmdit", width=128, depth=2, heads=4, head_dim=32, qkv_bias=True,
                 qk_norm=True, patch_size=8, prediction="x0", edit_source="residual")
  c.model.mmdit.update(variant="flux", single_depth=2, axes_dims=(8, 12, 12), pooled_dim=128,
                       edit="concat")
  c.model.condition.update(encoder="text", depth=1)
  # the text encoder reads word tokens (one id a word of the Shapes texts, as a BPE vocabulary
  # gives common words): edits exactly right 0.611 / objects 0.712 against 0.556 / 0.692 over bytes
  c.data.update(image_size=32, seq_len=96, batch_size=16, docs_per_row=1, cfg_dropout=0.1,
                image_dropout=0.1, two_object_prob=0.3, tokenizer="shapes")
  c.data.tasks = dict(t2i=0.45, edit=0.55)
  c.flow.shift = 8.0
  c.optim.update(lr=2e-3, warmup_steps=100)
  c.train.update(steps=2400, log_every=100, ckpt_every=600, time_limit_s=780.0)
  c.sample.update(steps=25, cfg_scale=2.0, image_cfg_scale=1.0)
  return c
