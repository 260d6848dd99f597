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
import os

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


IMAGE_TOKENIZERS = ("pixels", "vae", "vq")


class _PixelGrid:
  """The geometry of a tokenizer whose tokens each cover patch_size x patch_size pixels
  (grid, positions, size checks), taken from the PixelPatches of that patch size."""

  def _grid(self, image_size, patch_size):
    self.pixels = PixelPatches(image_size, patch_size)
    for k in ("image_size", "patch_size", "grid", "num_patches", "buckets", "max_rows",
              "max_cols", "num_positions"):
      setattr(self, k, getattr(self.pixels, k))

  def bucket_size(self, aspect):
    return self.pixels.bucket_size(aspect)

  def patch_index(self, rows, cols):
    return self.pixels.patch_index(rows, cols)

  def check(self, image, what="image"):
    self.pixels.check(image, what)


class LatentPatches(_PixelGrid):
  """KL-VAE latents as the image tokens: the image is encoded by a trained VAE
  (`unimm.models.autoencoder`, f-fold downsampling, c normalised channels) and
  its latent grid cut into q x q patches (q = model.latent_patch), so a token
  covers f*q pixels (`patch_size`) and carries q*q*c values (`patch_dim`).
  Same interface as PixelPatches; encode / decode run the VAE (numpy in and out)."""

  def __init__(self, vae, image_size: int, latent_patch: int):
    self.vae, self.q = vae, int(latent_patch)
    self.f = vae.factor
    self._grid(image_size, self.f * self.q)
    self.channels = vae.channels
    self.patch_dim = self.q * self.q * self.channels

  def __reduce__(self):
    return (LatentPatches, (self.vae, self.image_size, self.q))

  def from_latent(self, z):
    """Latents [h, w, c] (e.g. from a latent cache) -> [N, q*q*c] tokens."""
    z = np.asarray(z, np.float32)
    h, w = z.shape[0] // self.q, z.shape[1] // self.q
    z = z.reshape(h, self.q, w, self.q, self.channels).transpose(0, 2, 1, 3, 4)
    return z.reshape(h * w, self.patch_dim)

  def encode(self, images, xp=np):
    self.check(images)
    images = np.asarray(images)
    single = images.ndim == 3
    z = self.vae.encode(images[None] if single else images)
    out = np.stack([self.from_latent(x) for x in z])
    return out[0] if single else out

  def decode(self, patches, xp=np, grid=None):
    rows, cols = grid or (self.grid, self.grid)
    x = np.asarray(patches, np.float32)
    lead = x.shape[:-2]
    x = x.reshape(-1, rows, cols, self.q, self.q, self.channels).transpose(0, 1, 3, 2, 4, 5)
    z = x.reshape(-1, rows * self.q, cols * self.q, self.channels)
    return self.vae.decode(z).reshape(*lead, rows * self.patch_size, cols * self.patch_size, 3)


class CodeTokens(_PixelGrid):
  """VQ codes as the image tokens (Chameleon / Emu3 / Janus-Pro generation / MaskGIT):
  one token per code of a trained VQ / FSQ / LFQ tokenizer, code k entering as token id
  `code_offset + k` of the model's vocabulary (after the text ids; `mask_id` follows
  the codes). `understanding` (a PixelPatches, Janus-Pro) encodes condition images as
  pixel patches instead; `patch_dim` is its patch size (0 without)."""

  discrete = True

  def __init__(self, vq, image_size: int, code_offset: int, understanding=None, causal=True):
    """causal: codes are read left to right like text (next-token generation; modality
    TEXT in the batch); else each image's codes attend to each other (masked generation)."""
    self.vq, self.code_offset, self.understanding = vq, int(code_offset), understanding
    self.causal = bool(causal)
    self._grid(image_size, vq.factor)
    self.num_codes = vq.num_codes
    self.mask_id = self.code_offset + self.num_codes
    self.patch_dim = understanding.patch_dim if understanding is not None else 0
    if understanding is not None:
      self.max_rows = max(self.max_rows, understanding.max_rows)
      self.max_cols = max(self.max_cols, understanding.max_cols)
      self.num_positions = self.max_rows * self.max_cols

  def __reduce__(self):
    return (CodeTokens, (self.vq, self.image_size, self.code_offset, self.understanding,
                         self.causal))

  def vocab_size(self, multiple=128):
    """Embedding rows: the text ids, the codes and the mask id, rounded up."""
    return -(-(self.mask_id + 1) // multiple) * multiple

  def from_latent(self, codes):
    """Codes [h, w] -> token ids [N]."""
    return np.asarray(codes, np.int32).reshape(-1) + self.code_offset

  def encode(self, images, xp=np):
    """uint8 [..., H, W, 3] -> token ids [..., N] (codes + code_offset)."""
    self.check(images)
    images = np.asarray(images)
    single = images.ndim == 3
    codes = self.vq.encode(images[None] if single else images)
    ids = codes.reshape(codes.shape[0], -1).astype(np.int32) + self.code_offset
    return ids[0] if single else ids

  def decode(self, ids, xp=np, grid=None):
    """Token ids [..., N] -> uint8 images; ids outside the codes (text, mask) become code 0."""
    rows, cols = grid or (self.grid, self.grid)
    ids = np.asarray(ids)
    lead = ids.shape[:-1]
    codes = ids.reshape(-1, rows, cols) - self.code_offset
    codes = np.where((codes >= 0) & (codes < self.num_codes), codes, 0)
    return self.vq.decode(codes).reshape(*lead, rows * self.patch_size, cols * self.patch_size, 3)


_LOADED = {}


def load_trained(path, kind):
  """The trained autoencoder of a tokenizer workdir (loaded once per process)."""
  from unimm.models.autoencoder import load_autoencoder
  key = os.path.abspath(str(path))
  if key not in _LOADED:
    if not path:
      raise UserError(f"model.image_tokenizer='{kind}' needs model.tokenizer_path: the workdir of "
                      f"a tokenizer trained with python -m unimm.train.autoencoder")
    _LOADED[key] = load_autoencoder(path)
  ae = _LOADED[key]
  if ae.kind != kind:
    raise UserError(f"model.tokenizer_path '{path}' holds a '{ae.kind}' tokenizer but "
                    f"model.image_tokenizer is '{kind}': set one to match the other")
  return ae


def image_tokenizer(cfg):
  """The image tokenizer of a full config (data.image_size, data.max_aspect,
  model.patch_size, model.image_tokenizer, model.tokenizer_path, model.latent_patch,
  model.image_loss, model.understanding)."""
  m, d = cfg.model, cfg.data
  kind = getattr(m, "image_tokenizer", "pixels")
  if kind not in IMAGE_TOKENIZERS:
    raise UserError(f"model.image_tokenizer='{kind}': use one of {', '.join(IMAGE_TOKENIZERS)}")
  loss = getattr(m, "image_loss", "flow")
  if (kind == "vq") != (loss in ("next_token", "masked")):
    raise UserError(f"model.image_loss='{loss}' does not go with model.image_tokenizer='{kind}': "
                    "'flow' trains pixels or vae latents; 'next_token' and 'masked' train vq codes")
  max_aspect = float(getattr(d, "max_aspect", 1.0))
  if kind == "pixels":
    return PixelPatches(int(d.image_size), int(m.patch_size), max_aspect=max_aspect)
  if max_aspect != 1.0:
    raise UserError(f"model.image_tokenizer='{kind}' supports square images only: set "
                    "data.max_aspect=1")
  ae = load_trained(m.tokenizer_path, kind)
  if kind == "vae":
    return LatentPatches(ae, int(d.image_size), int(m.latent_patch))
  from unimm.data.tokenizer import load_tokenizer
  offset = load_tokenizer(d.tokenizer).model_vocab_size()
  understanding = None
  if getattr(m, "understanding", "shared") == "pixels":
    understanding = PixelPatches(int(d.image_size), int(m.patch_size))
  return CodeTokens(ae, int(d.image_size), offset, understanding, causal=loss == "next_token")
