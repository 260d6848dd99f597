"""The image-tokenizer slot of the unified model.

Every image enters the sequence as a grid of patch vectors and leaves it the
same way. `PixelPatches` is the identity tokenizer (raw pixels in [-1, 1] cut
into p x p patches); the VAE and VQ tokenizers plug into the same interface:
`encode(images uint8 [..., H, W, 3]) -> [..., N, D]`, `decode([..., N, D]) ->
uint8 images`, `num_patches`, `patch_dim`.
Works on numpy (data pipeline) and jax.numpy (sampling) alike.

Aspect-ratio buckets: with max_aspect > 1 an image may also be any patch grid
rows x cols whose aspect cols/rows is within [1/max_aspect, max_aspect] and
whose patch count is at most the square's (so the token budget holds). Patch
k of an image sits at (row, col) = divmod(k, cols) and enters the model as
`patch_index = row * max_cols + col`, one table of positions for all buckets
(for square-only data that is just k).
"""

import math

import numpy as np

from unimm.errors import UserError


class PixelPatches:
  """Raw pixels, row-major p x p patches, each flattened as (p, p, C)."""

  def __init__(self, image_size: int, patch_size: int, channels: int = 3,
               max_aspect: float = 1.0):
    if image_size % patch_size:
      raise UserError(
          f"image_size {image_size} is not a multiple of patch_size {patch_size}: "
          "set data.image_size / model.patch_size so that it divides")
    if not max_aspect >= 1.0:
      raise UserError(f"data.max_aspect is {max_aspect}: set it to 1 (square images only) "
                      "or more (aspect-ratio buckets up to that ratio)")
    self.image_size = image_size
    self.patch_size = patch_size
    self.channels = channels
    self.grid = image_size // patch_size
    self.num_patches = self.grid * self.grid
    self.patch_dim = patch_size * patch_size * channels
    self.buckets = aspect_buckets(self.grid, max_aspect)
    self.max_rows = max(r for r, _ in self.buckets)
    self.max_cols = max(c for _, c in self.buckets)
    self.num_positions = self.max_rows * self.max_cols

  def bucket_size(self, aspect: float):
    """(height, width) in pixels of the bucket nearest to aspect = width / height."""
    r, c = min(self.buckets, key=lambda b: (abs(math.log(b[1] / b[0] / aspect)), -b[0] * b[1]))
    return r * self.patch_size, c * self.patch_size

  def patch_index(self, rows: int, cols: int):
    """The model's position ids of a rows x cols patch grid, row-major."""
    r, c = np.divmod(np.arange(rows * cols), cols)
    return (r * self.max_cols + c).astype(np.int32)

  def check(self, image, what: str = "image"):
    shape = tuple(getattr(image, "shape", ()))
    p = self.patch_size
    ok = (len(shape) >= 3 and shape[-1] == self.channels and shape[-3] % p == 0
          and shape[-2] % p == 0 and (shape[-3] // p, shape[-2] // p) in self.buckets)
    if not ok:
      sizes = ", ".join(f"{r * p}x{c * p}" for r, c in self.buckets)
      raise UserError(
          f"{what} has shape {shape}, expected (..., H, W, {self.channels}) with HxW one of "
          f"{sizes} (data.image_size={self.image_size}, RGB): resize or convert it first")

  def encode(self, images, xp=np):
    """uint8 [..., H, W, C] -> float32 [..., N, p*p*C] in [-1, 1] (N = H/p * W/p)."""
    self.check(images)
    p, c = self.patch_size, self.channels
    x = xp.asarray(images).astype(xp.float32) / 127.5 - 1.0
    lead, (h, w) = x.shape[:-3], x.shape[-3:-1]
    x = x.reshape(*lead, h // p, p, w // p, p, c)
    x = xp.moveaxis(x, -4, -3)  # [..., rows, cols, p, p, c]
    return x.reshape(*lead, (h // p) * (w // p), p * p * c)

  def decode(self, patches, xp=np, grid=None):
    """float [..., N, p*p*C] in [-1, 1] -> uint8 [..., H, W, C]; grid = (rows, cols)
    of a bucket (default: the square)."""
    rows, cols = grid or (self.grid, self.grid)
    p, c = self.patch_size, self.channels
    x = xp.asarray(patches, dtype=xp.float32)
    lead = x.shape[:-2]
    x = x.reshape(*lead, rows, cols, p, p, c)
    x = xp.moveaxis(x, -3, -4)  # [..., rows, p, cols, p, c]
    x = x.reshape(*lead, rows * p, cols * p, c)
    return xp.clip(xp.round((x + 1.0) * 127.5), 0, 255).astype(xp.uint8)


def aspect_buckets(grid: int, max_aspect: float = 1.0):
  """Patch grids (rows, cols): the square grid x grid, plus for every rows the
  widest cols with rows * cols <= grid**2 whose aspect is within max_aspect
  (and the transpose)."""
  out = {(grid, grid)}
  for rows in range(1, 4 * grid + 1):
    cols = grid * grid // rows
    if cols >= 1 and max(rows / cols, cols / rows) <= max_aspect + 1e-9:
      out.update({(rows, cols), (cols, rows)})
  return sorted(out)


def image_tokenizer(cfg):
  """The image tokenizer of a full config (data.image_size, data.max_aspect,
  model.patch_size, model.image_tokenizer)."""
  kind = getattr(cfg.model, "image_tokenizer", "pixels")
  if kind != "pixels":
    raise UserError(f"model.image_tokenizer='{kind}' is not available yet; use 'pixels'")
  return PixelPatches(int(cfg.data.image_size), int(cfg.model.patch_size),
                      max_aspect=float(getattr(cfg.data, "max_aspect", 1.0)))
