"""Image tokenizers built from a `tokenizer` config section, and loading a trained one.

`build_tokenizer(t)` makes the KL autoencoder (`unimm.models.vae.AutoencoderKL`)
or the quantized one (`VQAutoencoder`: the same conv encoder / decoder around a
VQ, FSQ or LFQ quantizer). `load_autoencoder(workdir)` restores what
`python -m unimm.train.autoencoder` trained there: `latents(variables, images)`,
a jax function of its variables that the train step runs on the device, and
numpy-in, numpy-out `encode` / `decode` for sampling and the `unimm.tokenize` CLI:

    vae: uint8 [n, H, W, 3] -> float32 latents [n, H/f, W/f, c], normalised
         (z - shift) * scale with shift / scale measured on held-out images
    vq:  uint8 [n, H, W, 3] -> int32 codes [n, H/f, W/f]
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.errors import UserError, read_json
from unimm.image_grid import downsampling, num_codes, tokenizer_config
from unimm.models.quantizers import FSQ, LFQ, QuantizerStat, VectorQuantizer
from unimm.models.vae import AutoencoderKL, Conv, Decoder, Encoder, VAEConfig

KINDS = ("vae", "vq")
QUANTIZERS = ("vq", "fsq", "lfq")


def vae_config(t) -> VAEConfig:
  return VAEConfig(block_out_channels=tuple(t.block_out_channels),
                   layers_per_block=int(t.layers_per_block), latent_channels=int(t.latent_channels),
                   norm_num_groups=int(t.norm_num_groups), scaling_factor=1.0)


def build_quantizer(t, rngs):
  if t.quantizer == "vq":
    return VectorQuantizer(t.num_codes, t.code_dim, beta=t.beta, l2_normalize=t.l2_normalize,
                           ema=t.ema, decay=t.decay, rngs=rngs)
  if t.quantizer == "fsq":
    return FSQ(t.fsq_levels)
  return LFQ(t.code_dim, entropy_weight=t.lfq_entropy_weight,
             commitment_weight=t.lfq_commitment_weight)


class VQAutoencoder(nnx.Module):
  """Encoder -> 1x1 conv to the code dim -> quantizer -> 1x1 conv to latent -> Decoder."""

  def __init__(self, t, *, rngs):
    vcfg = vae_config(t)
    self.encoder = Encoder(vcfg, rngs=rngs)
    self.quantizer = build_quantizer(t, rngs)
    self.quant_conv = Conv(2 * vcfg.latent_channels, self.quantizer.dim, 1, rngs=rngs)
    self.post_quant_conv = Conv(self.quantizer.dim, vcfg.latent_channels, 1, rngs=rngs)
    self.decoder = Decoder(vcfg, rngs=rngs)

  def encode(self, x):
    """x [B, H, W, 3] in [-1, 1] -> quantizer inputs [B, H/f, W/f, code dim]."""
    return self.quant_conv(self.encoder(x))

  def decode(self, z_q):
    return self.decoder(self.post_quant_conv(z_q))


def build_tokenizer(t, rngs):
  return AutoencoderKL(vae_config(t), rngs=rngs) if t.kind == "vae" else VQAutoencoder(t, rngs=rngs)


def to_float(images):
  """uint8 [..., 3] -> float32 in [-1, 1]."""
  return images.astype(jnp.float32) / 127.5 - 1.0


def to_uint8(x):
  return jnp.clip(jnp.round((x.astype(jnp.float32) + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


def _path(keys) -> str:
  names = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in keys]
  return ".".join(names[:-1] if names and names[-1] == "value" else names)


def check_shapes(saved, expected, where):
  """Raises a one-line UserError at the first leaf of `expected` (a pytree of arrays or
  ShapeDtypeStructs) whose shape differs from `saved` (same structure, anything with .shape),
  or that `saved` lacks; parameters ('params...') are checked before anything else."""
  have = {_path(k): v for k, v in jax.tree_util.tree_leaves_with_path(saved)}
  leaves = [(_path(k), v) for k, v in jax.tree_util.tree_leaves_with_path(expected)]
  for name, want in sorted(leaves, key=lambda kv: not kv[0].startswith("params")):
    if name not in have:
      raise UserError(f"{where} has no parameter '{name}' (the config expects shape "
                      f"{tuple(want.shape)}): it was trained with another config")
    if tuple(have[name].shape) != tuple(want.shape):
      raise UserError(f"{where} does not match the config: parameter '{name}' has shape "
                      f"{tuple(have[name].shape)} in the checkpoint but {tuple(want.shape)} "
                      "in the config; use the config the checkpoint was trained with")


def restore_params(directory, abstract, keys=("params",)):
  """The `keys` parts of the latest Orbax checkpoint in `directory` (the train state of
  `unimm.train.autoencoder`), shape-checked against `abstract` ({key: pytree}) before any
  array is read, restored onto the first device."""
  import orbax.checkpoint as ocp
  if not os.path.isdir(directory):
    raise UserError(f"no checkpoints in '{directory}': train the tokenizer first "
                    "(python -m unimm.train.autoencoder --config ... --workdir ...)")
  manager = ocp.CheckpointManager(directory, item_handlers=ocp.StandardCheckpointHandler())
  step = manager.latest_step()
  if step is None:
    raise UserError(f"no checkpoint in '{directory}': train the tokenizer first")
  try:
    meta = manager.item_metadata(step)
    meta = getattr(meta, "tree", meta)
    check_shapes({k: meta[k] for k in keys if k in meta}, abstract,
                 f"checkpoint {directory}/{step}")
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=dev),
                          meta)
    restored = manager.restore(step, args=ocp.args.StandardRestore(target))
  except (OSError, ValueError, KeyError, TypeError) as e:  # a damaged checkpoint
    if isinstance(e, UserError):
      raise
    why = " ".join(str(e).split()[:40]) or type(e).__name__
    raise UserError(f"checkpoint {directory}/{step} cannot be read ({type(e).__name__}: {why}): "
                    f"it is damaged; move it away to use the one before it, or train again") from None
  manager.close()
  return {k: restored[k] for k in keys}, step


class TrainedAutoencoder:
  """A tokenizer trained by `python -m unimm.train.autoencoder`, restored from its workdir."""

  def __init__(self, workdir):
    workdir = os.path.abspath(workdir)
    t, self.image_size = tokenizer_config(workdir)
    self.workdir, self.t, self.kind = workdir, t, t.kind
    self.factor = downsampling(t)
    abstract = nnx.eval_shape(lambda: build_tokenizer(t, nnx.Rngs(0)))
    graphdef, abs_params, abs_stats = nnx.split(abstract, nnx.Param, QuantizerStat)
    want = {"params": abs_params, "stats": abs_stats}
    state, self.step = restore_params(os.path.join(workdir, "checkpoints"), want,
                                      keys=("params", "stats"))
    # the variables (parameters and quantizer statistics) are an input of the jax functions
    self.graphdef, self.variables = nnx.split(nnx.merge(graphdef, state["params"], state["stats"]))
    if t.kind == "vae":
      self.channels, self.num_codes = int(t.latent_channels), 0
      stats = _latent_stats(workdir)
      self.shift, self.scale = stats["latent_mean"], 1.0 / stats["latent_std"]
    else:
      self.channels, self.num_codes = 0, num_codes(t)
    self._encode = jax.jit(self.latents)
    self._decode = jax.jit(self._decode_fn)

  def latents(self, variables, images):
    """uint8 [n, H, W, 3] -> normalised latents [n, h, w, c] (vae) or codes [n, h, w] (vq):
    jax, a function of the tokenizer's `variables`."""
    model = nnx.merge(self.graphdef, variables)
    x = to_float(images)
    if self.kind == "vae":
      mean, _ = model.encode(x)
      return (mean - self.shift) * self.scale
    return model.quantizer(model.encode(x))["indices"].astype(jnp.int32)

  def _decode_fn(self, variables, z):
    model = nnx.merge(self.graphdef, variables)
    if self.kind == "vae":
      return to_uint8(model.decode(z / self.scale + self.shift))
    return to_uint8(model.decode(model.quantizer.indices_to_codes(z)))

  def encode(self, images):
    """uint8 [n, H, W, 3] -> latents float32 [n, h, w, c] (vae) or codes int32 [n, h, w] (vq)."""
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
      raise UserError(f"the tokenizer encodes uint8 [n, H, W, 3] images, got {images.dtype} "
                      f"{images.shape}")
    if images.shape[1] % self.factor or images.shape[2] % self.factor:
      raise UserError(f"image size {images.shape[1]}x{images.shape[2]} is not a multiple of the "
                      f"tokenizer's downsampling factor {self.factor}")
    return np.asarray(self._encode(self.variables, images))

  def decode(self, z):
    """Latents [n, h, w, c] or codes [n, h, w] -> uint8 images [n, h*f, w*f, 3]."""
    return np.asarray(self._decode(self.variables, jnp.asarray(z)))


def _latent_stats(workdir):
  path = os.path.join(workdir, "eval.json")
  try:
    stats = read_json(path, "evaluate the tokenizer again (python -m unimm.train.autoencoder ... "
                      "--workdir DIR)")
  except FileNotFoundError:
    stats = {}
  if "latent_std" not in stats:
    raise UserError(f"'{workdir}' has no latent statistics in eval.json: finish its training "
                    "(python -m unimm.train.autoencoder ... --workdir DIR) so that it evaluates")
  return stats


def load_autoencoder(workdir) -> TrainedAutoencoder:
  return TrainedAutoencoder(workdir)
