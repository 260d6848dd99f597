"""An FSQ tokenizer on 32x32 Shapes images: f=4 (8x8 tokens), levels (8, 5, 5, 5) = 1000
codes, no codebook to collapse and no auxiliary loss.

    python -m unimm.train.autoencoder --config configs/fsq_shapes.py --workdir runs/fsq

Measured on a 2-core CPU shared with other jobs: stopped by time_limit_s at step 570
(1.3 steps/s, 7 minutes), held-out (512 images) PSNR 35.8 dB, usage 0.307 (307 of 1000
codes), perplexity 20.2 (eval.json). No collapse, but FSQ has no force spreading the
codes: most tokens are black background and the used codes are the ones objects need.

Fields: `unimm.train.autoencoder.tokenizer_defaults()`.
"""

from unimm.train.autoencoder import default_config


def get_config():
  c = default_config()
  c.tokenizer.update(kind="vq", quantizer="fsq", block_out_channels=(32, 64, 64),
                     layers_per_block=1, latent_channels=4, norm_num_groups=8, rec_loss="l2",
                     fsq_levels=(8, 5, 5, 5))
  c.data.update(image_size=32, batch_size=32, two_object_prob=0.5)
  c.optim.update(lr=2e-3, warmup_steps=50, b2=0.99, weight_decay=0.0, final_lr_fraction=0.05)
  c.train.update(steps=1500, log_every=100, ckpt_every=500, time_limit_s=420.0)
  return c
