"""The demo model trained on KL-VAE latents instead of pixels (Transfusion / Stable
Diffusion style): images enter as 4x4 patches of the 4-channel latents of the Shapes
VAE (f=2, so a token covers 8x8 pixels, as in the pixel demo), the flow loss is on
the normalised latents and samples are decoded by the VAE.

    python -m unimm.train.autoencoder --config configs/vae_shapes.py --workdir runs/vae_shapes
    python -m unimm.train --config configs/transfusion_vae.py --workdir runs/transfusion_vae
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "demo.py"))  # model, data, optim, steps
  c.model.update(image_tokenizer="vae", tokenizer_path="runs/vae_shapes", latent_patch=4)
  c.flow.update(unshifted_prob=0.0, max_weight=0.0)  # as measured (before the demo's t mixture)
  return c
