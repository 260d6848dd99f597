"""The image-tokenizer slot of the unified model.

Every image enters the sequence as a grid of patch vectors and leaves it the
same way. `PixelPatches` is the identity tokenizer (raw pixels in [-1, 1] cut
into p x p patches); the VAE and VQ tokenizers plug into the same interface:
`encode(images uint8 [..., H, W, 3]) -> [..., N, D]`, `decode([..., N, D]) ->
uint8 images`, `num_patches`, `patch_dim`.
Works on numpy (data pipeline) and jax.numpy (sampling) alike.
"""

import numpy as np

from unimm.errors import UserError


class PixelPatches:
  """Raw pixels, row-major p x p patches, each flattened as (p, p, C)."""

  def __init__(self, image_size: int, patch_size: int, channels: int = 3):
    if image_size % patch_size:
      raise UserError(
          f"image_size {image_size} is not a multiple of patch_size {patch_size}: "
          "set data.image_size / model.patch_size so that it divides")
    self.image_size = image_size
    self.patch_size = patch_size
    self.channels = channels
    self.grid = image_size // patch_size
    self.num_patches = self.grid * self.grid
    self.patch_dim = patch_size * patch_size * channels

  def check(self, image, what: str = "image"):
    shape = tuple(getattr(image, "shape", ()))
    want = (self.image_size, self.image_size, self.channels)
    if shape[-3:] != want:
      raise UserError(
          f"{what} has shape {shape}, expected (..., {want[0]}, {want[1]}, {want[2]}) "
          f"(data.image_size={self.image_size}, RGB): resize or convert it first")

  def encode(self, images, xp=np):
    """uint8 [..., H, W, C] -> float32 [..., N, p*p*C] in [-1, 1]."""
    self.check(images)
    g, p, c = self.grid, self.patch_size, self.channels
    x = xp.asarray(images).astype(xp.float32) / 127.5 - 1.0
    lead = x.shape[:-3]
    x = x.reshape(*lead, g, p, g, p, c)
    x = xp.moveaxis(x, -4, -3)  # [..., g, g, p, p, c]
    return x.reshape(*lead, g * g, p * p * c)

  def decode(self, patches, xp=np):
    """float [..., N, p*p*C] in [-1, 1] -> uint8 [..., H, W, C]."""
    g, p, c = self.grid, self.patch_size, self.channels
    x = xp.asarray(patches, dtype=xp.float32)
    lead = x.shape[:-2]
    x = x.reshape(*lead, g, g, p, p, c)
    x = xp.moveaxis(x, -3, -4)  # [..., g, p, g, p, c]
    x = x.reshape(*lead, g * p, g * p, c)
    return xp.clip(xp.round((x + 1.0) * 127.5), 0, 255).astype(xp.uint8)
