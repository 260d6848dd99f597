"""The image-tokenizer slot of the unified model: trained tokenizers, encoding on the device.

The grid (patch size, buckets, positions, how an image enters the batch) is
`unimm.image_grid`, shared with the data pipeline. `PixelPatches` (raw pixel
patches) needs no model. `LatentPatches` (KL-VAE latents) and `CodeTokens` (VQ
codes) add the trained tokenizer: the pipeline delivers their images as pixels
(the batch's `pixels` and `encode`), and `encode_images` turns those into the
tokens the model reads, on the device, inside the jitted train step (and the
sampler), with the tokenizer's variables as an input:

    pixels [B, L, P] uint8 -> images [B * L // N, H, W, 3] -> tokenizer.tokens
        -> vae: `patches` (normalised latent patches); vq: `tokens`, `targets` (code ids)

`QueryCodes` (SEED-LLaMA) is a `CodeGrid` whose codes come from a query tokenizer and whose
decoder is an MMDiT; `RenderedCodes` (X-Omni) VQ codes rendered by an MMDiT conditioned on them
(model.image_decoder), which trains on `CodedPixels` (pixel patches plus each target's codes).
`decode` (token vectors or ids -> uint8 images) serves sampling.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.batch import NOISED_IMAGE
from unimm.errors import UserError
from unimm.image_grid import CodeGrid, LatentGrid, PixelPatches, image_grid, unpatchify
from unimm.parallel.sharding import constrain


class LatentPatches(LatentGrid):
  """A trained KL-VAE's normalised latents as the image tokens (`LatentGrid`, with the
  VAE of `unimm.models.autoencoder`)."""

  def __init__(self, vae, image_size: int, latent_patch: int):
    super().__init__(image_size, vae.factor, vae.channels, latent_patch)
    self.vae, self.variables = vae, vae.variables

  def tokens(self, variables, images):
    """uint8 [n, H, W, 3] -> latent patches float32 [n, N, q*q*c] (jax)."""
    return self.from_latent(self.vae.latents(variables, images), xp=jnp)

  def decode(self, patches, grid=None):
    """[..., N, q*q*c] -> uint8 images [..., H, W, 3] (numpy)."""
    rows, cols = grid or (self.grid, self.grid)
    patches = np.asarray(patches, np.float32)
    lead = patches.shape[:-2]
    z = self.to_latent(patches, grid).reshape(-1, rows * self.q, cols * self.q, self.channels)
    return self.vae.decode(z).reshape(*lead, rows * self.patch_size, cols * self.patch_size, 3)


class CodeTokens(CodeGrid):
  """A trained VQ / FSQ / LFQ tokenizer's codes as the image tokens (`CodeGrid`, with the
  quantized autoencoder of `unimm.models.autoencoder`)."""

  def __init__(self, vq, image_size: int, code_offset: int, understanding=None, causal=True):
    super().__init__(image_size, vq.factor, vq.num_codes, code_offset, understanding, causal)
    self.vq, self.variables = vq, vq.variables

  def tokens(self, variables, images):
    """uint8 [n, H, W, 3] -> token ids int32 [n, N] (code_offset + code; jax)."""
    return self.from_latent(self.vq.latents(variables, images), xp=jnp)

  def decode(self, ids, grid=None):
    """Token ids [..., N] -> uint8 images; ids outside the codes (text, mask) become code 0."""
    return self.vq_decode(ids, grid)

  def vq_decode(self, ids, grid=None):
    """`decode` by the tokenizer's own decoder, also where a diffusion decoder renders
    the samples (`RenderedCodes`): one convolutional pass."""
    rows, cols = grid or (self.grid, self.grid)
    codes = _codes(self, ids).reshape(-1, rows, cols)
    return self.vq.decode(codes).reshape(*np.shape(ids)[:-1], rows * self.patch_size,
                                         cols * self.patch_size, 3)


def _codes(grid, ids):
  """Token ids [..., Q] -> code ids [M, Q] (numpy); ids outside the codes become code 0."""
  ids = np.asarray(ids)
  codes = ids.reshape(-1, ids.shape[-1]) - grid.code_offset
  return np.where((codes >= 0) & (codes < grid.num_codes), codes, 0)


class RenderedCodes(CodeTokens):
  """X-Omni: a VQ tokenizer's codes as the image tokens (`CodeTokens`), rendered into pixels by
  a diffusion decoder (model.image_decoder: an MMDiT trained with model.condition.encoder="vq"
  on the same tokenizer; Euler on its own schedule, noise of seed 0) instead of the VQ decoder."""

  def __init__(self, vq, image_size: int, code_offset: int, understanding, causal, decoder):
    super().__init__(vq, image_size, code_offset, understanding, causal)
    self.decoder = decoder

  def decode(self, ids, grid=None):
    del grid
    return _render(self.decoder, self, ids)


def _render(decoder, grid, ids):
  """Token ids [..., Q] -> uint8 images [..., H, W, 3] by a code-conditioned MMDiT's sampler."""
  images = decoder.render_codes(_codes(grid, ids))
  return images.reshape(*np.shape(ids)[:-1], *images.shape[1:])


class CodedPixels(PixelPatches):
  """Pixel patches of an MMDiT whose text stream is its target image's VQ codes
  (model.condition.encoder="vq": X-Omni's diffusion decoder): `encode_images` adds the batch's
  `codes` [B, n], those of each row's first target image by the frozen tokenizer."""

  def __init__(self, grid, vq):
    super().__init__(grid.image_size, grid.patch_size, grid.channels)
    self.vq, self.variables, self.num_codes = vq, vq.variables, vq.num_codes

  def codes(self, variables, images):
    """uint8 [n, H, W, 3] -> the tokenizer's codes [n, h * w] int32 (raster order; jax)."""
    z = self.vq.latents(variables, images)
    return z.reshape(z.shape[0], -1)

  def target_codes(self, variables, batch):
    from unimm.models.conditioning import first_positions  # pylint: disable=import-outside-toplevel
    idx, _ = first_positions(batch["modality"] == NOISED_IMAGE, self.num_patches)
    x = jnp.take_along_axis(batch["patches"], idx[..., None], axis=1)
    return self.codes(variables, self.decode(x, xp=jnp))


class QueryCodes(CodeGrid):
  """SEED-LLaMA: the codes of a trained query tokenizer (an MMDiT workdir trained with
  model.condition.encoder="seed": ViT, causal Q-Former, FSQ) as the image tokens, Q of them an
  image in the Q-Former's order; its MMDiT is the decoder that renders codes into pixels (Euler
  on the tokenizer's own schedule, from noise of a fixed seed)."""

  def __init__(self, sampler, image_size: int, factor: int, code_offset: int, causal=True):
    model = nnx.merge(sampler.graphdef, sampler.params)
    super().__init__(image_size, factor, model.seed.fsq.num_codes, code_offset, None, causal)
    self.rendered = sampler.patcher  # the decoder MMDiT's pixel patches
    self.seed_graph, self.variables = nnx.split(model.seed, nnx.Param)
    self.sampler = sampler

  def tokens(self, variables, images):
    """uint8 [n, H, W, 3] -> token ids int32 [n, Q] (code_offset + code; jax)."""
    seed = nnx.merge(self.seed_graph, variables)
    return seed.codes(self.rendered.encode(images, xp=jnp)) + self.code_offset

  def decode(self, ids, grid=None):
    """Token ids [..., Q] -> uint8 images, rendered by the tokenizer's MMDiT (sample.* of its
    config, noise of seed 0); ids outside the codes (text, mask) become code 0."""
    del grid
    return _render(self.sampler, self, ids)


_LOADED = {}


def load_trained(path):
  """The trained autoencoder of a tokenizer workdir (loaded once per process)."""
  from unimm.models.autoencoder import load_autoencoder
  key = os.path.abspath(str(path))
  if key not in _LOADED:
    _LOADED[key] = load_autoencoder(path)
  return _LOADED[key]


def image_tokenizer(cfg, text_vocab):
  """The image tokenizer of a full config (see `unimm.image_grid.image_grid`, which checks
  the config): PixelPatches, or LatentPatches / CodeTokens with the trained tokenizer of
  model.tokenizer_path (RenderedCodes with model.image_decoder); CodedPixels for an MMDiT
  conditioned on VQ codes. text_vocab: the text tokenizer's embedding rows."""
  grid = image_grid(cfg, text_vocab)
  m = cfg.model
  if getattr(m, "family", "unified") == "mmdit" and m.condition.encoder == "vq":
    return CodedPixels(grid, _vq_tokenizer(m.condition.tokenizer, grid.image_size,
                                           "model.condition.tokenizer"))
  if getattr(m, "image_decoder", "") and getattr(m, "image_tokenizer", "pixels") != "vq":
    raise UserError(f"model.image_decoder renders vq codes: it needs model.image_tokenizer='vq', "
                    f"not '{m.image_tokenizer}'")
  if isinstance(grid, PixelPatches):
    return grid
  if getattr(cfg.model, "image_tokenizer", "") == "seed":
    key = ("seed", os.path.abspath(str(cfg.model.tokenizer_path)))
    if key not in _LOADED:
      from unimm.sample import load_sampler  # pylint: disable=import-outside-toplevel
      _LOADED[key] = load_sampler(cfg.model.tokenizer_path)
    return QueryCodes(_LOADED[key], grid.image_size, grid.patch_size, grid.code_offset, grid.causal)
  ae = load_trained(cfg.model.tokenizer_path)
  if isinstance(grid, LatentGrid):
    return LatentPatches(ae, grid.image_size, grid.q)
  if getattr(m, "image_decoder", ""):
    return RenderedCodes(ae, grid.image_size, grid.code_offset, grid.understanding, grid.causal,
                         _decoder(m.image_decoder, ae))
  return CodeTokens(ae, grid.image_size, grid.code_offset, grid.understanding, grid.causal)


def _vq_tokenizer(path, image_size, field):
  """The trained VQ tokenizer of `path` (loaded once), checked for images of image_size."""
  if not path:
    raise UserError(f"{field} is empty: give the workdir of a VQ tokenizer trained with python -m "
                    "unimm.train.autoencoder --config configs/vq_shapes.py")
  ae = load_trained(path)
  if ae.kind == "vae" or ae.image_size != image_size:
    raise UserError(f"{field}={path} holds a {ae.kind} tokenizer of {ae.image_size}-pixel images: "
                    f"give a VQ tokenizer trained on data.image_size={image_size}")
  return ae


def _decoder(path, ae):
  """The sampler of the diffusion decoder in `path` (model.image_decoder, loaded once): an
  MMDiT conditioned on the codes of the same tokenizer as `ae` (checked before loading)."""
  key = ("decoder", os.path.abspath(str(path)))
  if key not in _LOADED:
    from unimm.sample import _workdir_config, load_sampler  # pylint: disable=import-outside-toplevel
    from etils import epath  # pylint: disable=import-outside-toplevel
    if not (epath.Path(path) / "config.json").exists():  # local or gs://, as _workdir_config
      raise UserError(f"model.image_decoder={path} holds no training workdir: train the decoder "
                      f"with python -m unimm.train --config configs/x_omni_decoder_shapes.py")
    cfg = _workdir_config({"workdir": path})
    cond = cfg.model.condition
    if (getattr(cfg.model, "family", "") != "mmdit" or cond.encoder != "vq"
        or os.path.abspath(cond.tokenizer) != ae.workdir):
      raise UserError(f"model.image_decoder={path} is no diffusion decoder of the codes of "
                      f"{ae.workdir}: train one with model.condition.encoder='vq' and "
                      f"model.condition.tokenizer={ae.workdir} (configs/x_omni_decoder_shapes.py)")
    _LOADED[key] = load_sampler(path, cfg)
  return _LOADED[key]


def frozen_variables(tokenizer):
  """The variables `encode_images` takes: the trained tokenizer's (never optimised); none
  for pixel patches."""
  return getattr(tokenizer, "variables", {})


def encode_images(tokenizer, variables, batch):
  """The batch the model reads: at its `encode` positions, the tokens of their `pixels`
  (jax, inside the jitted train step and the sampler). vae: `patches` become the normalised
  latent patches; vq: `tokens` become the code ids, and `targets` the id of the next
  position where that is encoded. Pixel patches need nothing, nor does a batch with no
  pixels to encode (e.g. all from latent caches): it comes back as it is."""
  if hasattr(tokenizer, "target_codes"):  # X-Omni's decoder: the codes of its target images
    return dict(batch, codes=tokenizer.target_codes(variables, batch))
  if not hasattr(tokenizer, "tokens") or batch["encode"].shape[1] < tokenizer.num_patches:
    return batch
  return jax.lax.cond(jnp.any(batch["encode"] > 0),
                      lambda b: _encode(tokenizer, variables, b), lambda b: b, batch)


def _encode(tokenizer, variables, batch):
  """encode_images on a batch. Each encoded image is N = grid**2 contiguous positions of one
  row, in token order, so the k-th encoded position of a row is token k % N of the row's
  image k // N. Every row's pixels are scattered into L // N image slots (a static bound;
  empty slots encode black images), all slots are encoded in one call, and each position
  gathers its token back."""
  encode = batch["encode"] > 0
  n = tokenizer.num_patches
  slots = encode.shape[1] // n
  rank = jnp.cumsum(encode, axis=1) - 1  # position -> its index among the row's encoded tokens
  into = jnp.where(encode, rank, slots * n)  # out of range: dropped
  pixels = jax.vmap(lambda px, at: jnp.zeros((slots * n, px.shape[-1]), px.dtype)
                    .at[at].set(px, mode="drop"))(batch["pixels"], into)
  g = tokenizer.grid
  images = unpatchify(pixels.reshape(-1, n, pixels.shape[-1]), tokenizer.patch_size, g, g, jnp)
  images = constrain(images, ("batch", None, None, None))
  tokens = tokenizer.tokens(variables, images)
  tokens = tokens.reshape(encode.shape[0], slots * n, *tokens.shape[2:])
  found = jax.vmap(lambda t, r: t[r])(tokens, jnp.maximum(rank, 0))
  if not getattr(tokenizer, "discrete", False):
    return dict(batch, patches=jnp.where(encode[..., None], found, batch["patches"]))
  ids = jnp.where(encode, found, batch["tokens"])
  next_encoded = jnp.pad(encode[:, 1:], ((0, 0), (0, 1)))
  next_ids = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
  return dict(batch, tokens=ids, targets=jnp.where(next_encoded, next_ids, batch["targets"]))
