"""The demo: a 1M-parameter unified model trained on the built-in Shapes world on CPU.

    python -m unimm.train --config configs/demo.py --workdir runs/demo

About 1800 steps of 8 x 256 packed tokens: 9 minutes on a 2-core CPU, then ShapesEval.
Choices measured on that machine (see README): the network predicts the clean image
(converted to velocity), the flow loss weighs 3x the text loss, generation tasks get most
of the data, t is shifted toward noise (flow.shift=4: where an edit's change is decided) with
30% of the draws unshifted and an x0 error's weight capped at 4 (as in mmdit_shapes: shape 0.852
against 0.685, edits 0.472 / 0.615 against 0.417 / 0.577 at the same time limit), and
sampling guides at 2 (text to image and edits both score best there).
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(width=128, depth=4, heads=4, mlp_dim=384, patch_size=8, prediction="x0",
                 edit_source="residual")
  c.data.update(image_size=32, seq_len=256, batch_size=8, image_dropout=0.1)
  c.data.tasks.update(t2i=0.45, caption=0.15, qa=0.1, edit=0.25, story=0.05)
  c.flow.loss_weight = 3.0
  c.flow.update(shift=4.0, unshifted_prob=0.3, max_weight=4.0)
  c.optim.update(lr=3e-3, warmup_steps=100)
  c.train.update(steps=1800, log_every=100, ckpt_every=600, time_limit_s=660.0)
  c.sample.cfg_scale = 2.0
  return c
