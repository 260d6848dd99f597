"""How images enter the batch: the image grid that the data pipeline and the model share.

Both sides import this module (and nothing of each other). It is computed from the config
and, for a trained tokenizer, the config.json of its workdir; no model is loaded here.

  pixels  `PixelPatches`: raw pixels in [-1, 1] cut into p x p patches (the batch's
          `patches`).
  vae     `LatentGrid`: a token is a q x q patch of the VAE's latents, so it covers f*q x f*q
          pixels. The pipeline delivers those pixels (the batch's `pixels`, uint8, with
          `encode` = 1); the train step encodes them with the frozen VAE into normalised
          latent patches (`unimm.models.image_tokenizer.encode_images`). Latents from a
          latent cache are cut into the same patches by the pipeline.
  vq      `CodeGrid`: a token is one code (id code_offset + code) covering f x f pixels; the
          same `pixels`, encoded into `tokens` and `targets` by the train step. Codes from a
          latent cache enter as ids directly.
  seed    a `CodeGrid` too: Q codes of a query tokenizer (SEED-LLaMA; an MMDiT workdir with
          model.condition.encoder="seed"), code k delivered as the k-th of sqrt(Q) x sqrt(Q)
          pixel patches, so the step reassembles the image and encodes it whole.

One layout serves pixels, latents and codes alike: `patchify` cuts [..., H, W, C] into
row-major p x p patches flattened as (p, p, C).

Aspect-ratio buckets: with max_aspect > 1 an image may also be any patch grid
rows x cols whose aspect cols/rows is within [1/max_aspect, max_aspect] and
whose patch count is at most the square's (so the token budget holds). Patch
k of an image sits at (row, col) = divmod(k, cols) and enters the model as
`patch_index = row * max_cols + col`, one table of positions for all buckets
(for square-only data that is just k).
"""

import json
import math
import os

import numpy as np

from unimm.config import tokenizer_defaults
from unimm.errors import UserError, read_json

IMAGE_TOKENIZERS = ("pixels", "vae", "vq", "seed")


def patchify(x, p, xp=np):
  """[..., H, W, C] -> [..., (H/p) * (W/p), p*p*C]: row-major p x p patches (dtype kept)."""
  lead, (h, w, c) = x.shape[:-3], x.shape[-3:]
  x = x.reshape(*lead, h // p, p, w // p, p, c)
  x = xp.moveaxis(x, -4, -3)  # [..., rows, cols, p, p, c]
  return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify(x, p, rows, cols, xp=np):
  """The inverse of patchify: [..., rows * cols, p*p*C] -> [..., rows*p, cols*p, C]."""
  lead = x.shape[:-2]
  c = x.shape[-1] // (p * p)
  x = x.reshape(*lead, rows, cols, p, p, c)
  x = xp.moveaxis(x, -3, -4)  # [..., rows, p, cols, p, c]
  return x.reshape(*lead, rows * p, cols * p, c)


class PixelPatches:
  """Raw pixels, row-major p x p patches, each flattened as (p, p, C)."""

  pixel_dim = 0  # its images are `patches`: nothing for the train step to encode

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
    return patchify(xp.asarray(images).astype(xp.float32) / 127.5 - 1.0, self.patch_size, xp)

  def decode(self, patches, xp=np, grid=None):
    """float [..., N, p*p*C] in [-1, 1] -> uint8 [..., H, W, C]; grid = (rows, cols)
    of a bucket (default: the square)."""
    rows, cols = grid or (self.grid, self.grid)
    x = unpatchify(xp.asarray(patches, dtype=xp.float32), self.patch_size, rows, cols, xp)
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


class _TokenGrid:
  """The grid of a trained tokenizer whose tokens each cover patch_size x patch_size pixels
  (grid, positions, size checks from the PixelPatches of that size, `footprint`). Its images
  enter the batch as those pixels, uint8 [N, pixel_dim], for the train step to encode."""

  def __init__(self, image_size, patch_size):
    self.footprint = PixelPatches(image_size, patch_size)
    for k in ("image_size", "patch_size", "grid", "num_patches", "buckets", "max_rows",
              "max_cols", "num_positions"):
      setattr(self, k, getattr(self.footprint, k))
    self.pixel_dim = self.footprint.patch_dim

  def bucket_size(self, aspect):
    return self.footprint.bucket_size(aspect)

  def patch_index(self, rows, cols):
    return self.footprint.patch_index(rows, cols)

  def check(self, image, what="image"):
    self.footprint.check(image, what)

  def pixels(self, image):
    """uint8 [H, W, 3] -> the batch's `pixels` of its tokens: uint8 [N, pixel_dim]."""
    self.check(image)
    return patchify(np.asarray(image, np.uint8), self.patch_size)


class LatentGrid(_TokenGrid):
  """KL-VAE latents as the image tokens: a trained VAE (f-fold downsampling, c normalised
  channels) whose latent grid is cut into q x q patches (q = model.latent_patch), so a token
  covers f*q pixels (`patch_size`) and carries q*q*c values (`patch_dim`)."""

  kind = "vae"

  def __init__(self, image_size: int, factor: int, channels: int, latent_patch: int):
    self.f, self.q, self.channels = int(factor), int(latent_patch), int(channels)
    super().__init__(image_size, self.f * self.q)
    self.patch_dim = self.q * self.q * self.channels

  def from_latent(self, z, xp=np):
    """Normalised latents [..., h, w, c] (of the VAE or a latent cache) -> [..., N, q*q*c]."""
    return patchify(xp.asarray(z, xp.float32), self.q, xp)

  def to_latent(self, patches, grid=None, xp=np):
    """[..., N, q*q*c] -> latents [..., h, w, c]; grid = (rows, cols) (default: the square)."""
    rows, cols = grid or (self.grid, self.grid)
    return unpatchify(xp.asarray(patches, xp.float32), self.q, rows, cols, xp)


class CodeGrid(_TokenGrid):
  """VQ codes as the image tokens (Chameleon / Emu3 / Janus-Pro generation / MaskGIT):
  one token per code of a trained VQ / FSQ / LFQ tokenizer (covering f x f pixels), code k
  entering as token id `code_offset + k` of the model's vocabulary (after the text ids;
  `mask_id` follows the codes). `understanding` (a PixelPatches, Janus-Pro) gives condition
  images as pixel patches instead; `patch_dim` is its patch size (0 without)."""

  kind = "vq"
  discrete = True

  def __init__(self, image_size: int, factor: int, num_codes: int, code_offset: int,
               understanding=None, causal=True):
    """causal: codes are read left to right like text (next-token generation; modality
    TEXT in the batch); else each image's codes attend to each other (masked generation)."""
    super().__init__(image_size, int(factor))
    self.num_codes, self.code_offset = int(num_codes), int(code_offset)
    self.understanding, self.causal = understanding, bool(causal)
    self.mask_id = self.code_offset + self.num_codes
    self.patch_dim = understanding.patch_dim if understanding is not None else 0
    if understanding is not None:
      self.max_rows = max(self.max_rows, understanding.max_rows)
      self.max_cols = max(self.max_cols, understanding.max_cols)
      self.num_positions = self.max_rows * self.max_cols

  def vocab_size(self, multiple=128):
    """Embedding rows: the text ids, the codes and the mask id, rounded up."""
    return -(-(self.mask_id + 1) // multiple) * multiple

  def from_latent(self, codes, xp=np):
    """Codes [..., h, w] (of the tokenizer or a latent cache) -> token ids [..., N]."""
    codes = xp.asarray(codes).astype(xp.int32)
    return codes.reshape(*codes.shape[:-2], -1) + self.code_offset


# ------------------------------------------------------------ from the config


def tokenizer_config(workdir):
  """(the `tokenizer` section over its defaults, the training image size) of a workdir of
  `python -m unimm.train.autoencoder`, read from its config.json."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"'{workdir}' is not a tokenizer workdir (no config.json): train one with "
                    "python -m unimm.train.autoencoder --config configs/vq_shapes.py --workdir DIR")
  saved = read_json(path, "the file is damaged; restore it from the tokenizer's training run")
  if not isinstance(saved.get("tokenizer"), dict):
    raise UserError(f"'{workdir}' holds no tokenizer (config.json has no 'tokenizer' section)")
  t = tokenizer_defaults()
  t.update({k: v for k, v in saved["tokenizer"].items() if k in t})
  return t, int(saved.get("data", {}).get("image_size", 0))


def seed_grid(workdir, image_size):
  """(the pixels a side each code is delivered as, the number of codes) of the query tokenizer
  in `workdir` (a `python -m unimm.train` workdir of an MMDiT with model.condition.encoder
  "seed"), for images of image_size pixels a side."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise UserError(f"'{workdir}' is not a training workdir (no config.json): train a query "
                    "tokenizer with python -m unimm.train --config configs/seed_tokenizer_shapes.py")
  saved = read_json(path, "the file is damaged; restore it from the tokenizer's training run")
  model = saved.get("model", {})
  cond = model.get("condition", {})
  if model.get("family") != "mmdit" or cond.get("encoder") != "seed":
    raise UserError(f"'{workdir}' holds no query tokenizer (model.image_tokenizer='seed' needs an "
                    "MMDiT trained with model.condition.encoder='seed')")
  q, size = int(cond["queries"]), int(saved["data"]["image_size"])
  side = math.isqrt(q)
  if side * side != q or image_size % side:
    raise UserError(f"the query tokenizer in '{workdir}' gives {q} codes an image: the LLM lays them "
                    f"out as a square grid dividing data.image_size={image_size}; train one with "
                    "a square model.condition.queries")
  if size != image_size:
    raise UserError(f"the query tokenizer in '{workdir}' was trained on {size}x{size} images: set "
                    f"data.image_size={size}")
  return image_size // side, int(np.prod(cond["levels"]))


def downsampling(t) -> int:
  """The tokenizer's downsampling factor f (of its `tokenizer` config section)."""
  return 2 ** (len(t.block_out_channels) - 1)


def num_codes(t) -> int:
  if t.quantizer == "vq":
    return int(t.num_codes)
  if t.quantizer == "fsq":
    return int(np.prod(t.fsq_levels))
  return 2 ** int(t.code_dim)


def image_grid(cfg, text_vocab):
  """The image grid of a full config (data.image_size, data.max_aspect, model.patch_size,
  model.image_tokenizer, model.tokenizer_path, model.latent_patch, model.image_loss,
  model.understanding): a PixelPatches, LatentGrid or CodeGrid. text_vocab: the text
  tokenizer's embedding rows (vq codes follow them)."""
  m, d = cfg.model, cfg.data
  kind = getattr(m, "image_tokenizer", "pixels")
  if kind not in IMAGE_TOKENIZERS:
    raise UserError(f"model.image_tokenizer='{kind}': use one of {', '.join(IMAGE_TOKENIZERS)}")
  loss = getattr(m, "image_loss", "flow")
  if (kind in ("vq", "seed")) != (loss in ("next_token", "masked")):
    raise UserError(f"model.image_loss='{loss}' does not go with model.image_tokenizer='{kind}': "
                    "'flow' trains pixels or vae latents; 'next_token' and 'masked' train vq codes")
  text_loss = getattr(m, "text_loss", "next_token")
  if text_loss not in ("next_token", "masked", "flow"):
    raise UserError(f"model.text_loss='{text_loss}': use 'next_token', 'masked' or 'flow'")
  if text_loss != "next_token" and loss != "masked":
    raise UserError(f"model.text_loss='{text_loss}' (text diffusion) goes with discrete images: it "
                    f"needs model.image_tokenizer='vq' and model.image_loss='masked', not "
                    f"'{kind}' / '{loss}'")
  max_aspect = float(getattr(d, "max_aspect", 1.0))
  if kind == "pixels":
    return PixelPatches(int(d.image_size), int(m.patch_size), max_aspect=max_aspect)
  if max_aspect != 1.0:
    raise UserError(f"model.image_tokenizer='{kind}' supports square images only: set "
                    "data.max_aspect=1")
  if not m.tokenizer_path:
    raise UserError(f"model.image_tokenizer='{kind}' needs model.tokenizer_path: the workdir of "
                    f"a tokenizer trained with python -m unimm.train.autoencoder")
  if kind == "seed":
    factor, codes = seed_grid(m.tokenizer_path, int(d.image_size))
    return CodeGrid(int(d.image_size), factor, codes, text_vocab, causal=loss == "next_token")
  t, _ = tokenizer_config(m.tokenizer_path)
  if t.kind != kind:
    raise UserError(f"model.tokenizer_path '{m.tokenizer_path}' holds a '{t.kind}' tokenizer but "
                    f"model.image_tokenizer is '{kind}': set one to match the other")
  if kind == "vae":
    return LatentGrid(int(d.image_size), downsampling(t), int(t.latent_channels),
                      int(m.latent_patch))
  understanding = None
  if getattr(m, "understanding", "shared") == "pixels":
    understanding = PixelPatches(int(d.image_size), int(m.patch_size))
  return CodeGrid(int(d.image_size), downsampling(t), num_codes(t), text_vocab, understanding,
                  causal=loss == "next_token")
