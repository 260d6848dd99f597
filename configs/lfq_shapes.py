"""An LFQ tokenizer on 32x32 Shapes images: f=4 (8x8 tokens), 10 bits = 1024 codes, with
MAGVIT-v2's entropy loss (per-token confidence, batch-level diversity) against collapse.

    python -m unimm.train.autoencoder --config configs/lfq_shapes.py --workdir runs/lfq

Measured on a 2-core CPU shared with other jobs: stopped by time_limit_s at step 501
(1.14 steps/s, 7 minutes), held-out (512 images) PSNR 24.8 dB, usage 0.117 (120 of 1024
codes), perplexity 10.6 (eval.json). No collapse, but the fewest codes and the slowest
reconstruction of the three quantizers here (untuned; the entropy term, about -0.67,
outweighs the reconstruction loss).

Fields: `unimm.train.autoencoder.tokenizer_defaults()`.
"""

from unimm.train.autoencoder import default_config


def get_config():
  c = default_config()
  c.tokenizer.update(kind="vq", quantizer="lfq", block_out_channels=(32, 64, 64),
                     layers_per_block=1, latent_channels=4, norm_num_groups=8, rec_loss="l2",
                     code_dim=10, lfq_entropy_weight=0.1, lfq_commitment_weight=0.25)
  c.data.update(image_size=32, batch_size=32, two_object_prob=0.5)
  c.optim.update(lr=2e-3, warmup_steps=50, b2=0.99, weight_decay=0.0, final_lr_fraction=0.05)
  c.train.update(steps=1500, log_every=100, ckpt_every=500, time_limit_s=420.0)
  return c
