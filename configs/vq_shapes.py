"""A VQ tokenizer on 32x32 Shapes images: f=4 (8x8 tokens), 1024 codes of dim 8,
l2-normalised, EMA codebook with dead-code restarts (so most codes stay in use).

    python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir runs/vq

Fields: `unimm.train.autoencoder.tokenizer_defaults()`.
"""

from unimm.train.autoencoder import default_config


def get_config():
  c = default_config()
  c.tokenizer.update(kind="vq", quantizer="vq", block_out_channels=(32, 64, 64),
                     layers_per_block=1, latent_channels=4, norm_num_groups=8, rec_loss="l1",
                     num_codes=1024, code_dim=8, beta=0.25, l2_normalize=True, ema=True,
                     decay=0.99, dead_code_threshold=0.1, restart_every=1)
  c.data.update(image_size=32, batch_size=32, two_object_prob=0.5)
  c.optim.update(lr=1e-3, warmup_steps=200, b2=0.99, weight_decay=0.0, final_lr_fraction=0.05)
  c.train.update(steps=3000, log_every=100, ckpt_every=1000, time_limit_s=540.0)
  return c
