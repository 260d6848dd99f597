"""KL autoencoder of Stable Diffusion / SDXL / SD3 / FLUX as Flax NNX modules, NHWC.

The architecture is diffusers' `AutoencoderKL` (Encoder, Decoder, ResnetBlock2D,
UNetMidBlock2D with one single-head attention), and module attributes carry
diffusers' names (`encoder.down_blocks.0.resnets.1.conv1`), so weight
conversion (`unimm.interop.diffusers_vae`) is a rename plus a transpose.

Parameters are float32 and replicated (their logical axes are None); modules
compute in the dtype of their parameters, group norm and softmax in float32.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.errors import UserError
from unimm.models.layers import param

# Public presets and their latent normalisation: z = (mean - shift) * scale.
FAMILIES = {
    "sd": dict(latent_channels=4, scaling_factor=0.18215, shift_factor=0.0,
               use_quant_conv=True, use_post_quant_conv=True),
    "sdxl": dict(latent_channels=4, scaling_factor=0.13025, shift_factor=0.0,
                 use_quant_conv=True, use_post_quant_conv=True),
    "sd3": dict(latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609,
                use_quant_conv=False, use_post_quant_conv=False),
    "flux": dict(latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """diffusers `AutoencoderKL` fields (defaults: the SD / FLUX f=8 layout)."""
  block_out_channels: tuple = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  in_channels: int = 3
  out_channels: int = 3
  norm_num_groups: int = 32
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  scaling_factor: float = 0.18215
  shift_factor: float = 0.0

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    for c in self.block_out_channels:
      if c % self.norm_num_groups:
        raise UserError(f"vae block_out_channels {self.block_out_channels}: each must be divisible "
                        f"by norm_num_groups={self.norm_num_groups}")


def family_config(name, **overrides) -> VAEConfig:
  """The preset `name` (one of FAMILIES) with any field overridden."""
  if name not in FAMILIES:
    raise UserError(f"unknown vae family '{name}'; choose one of {', '.join(FAMILIES)}")
  return VAEConfig(**{**FAMILIES[name], **overrides})


def _conv_param(rngs, k, cin, cout):
  return param(rngs, (k, k, cin, cout), (None, None, None, None), 1.0 / math.sqrt(k * k * cin))


class Conv(nnx.Module):
  """2-D convolution, HWIO kernel; `padding` as ((top, bottom), (left, right))."""

  def __init__(self, cin, cout, k, *, rngs, stride=1, padding=None):
    self.kernel = _conv_param(rngs, k, cin, cout)
    self.bias = param(rngs, (cout,), (None,), zeros=True)
    self.stride = stride
    self.padding = ((k // 2, k // 2),) * 2 if padding is None else padding

  def __call__(self, x):
    kernel = self.kernel[...]
    y = jax.lax.conv_general_dilated(
        x.astype(kernel.dtype), kernel, (self.stride, self.stride), self.padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...]


class Linear(nnx.Module):

  def __init__(self, cin, cout, *, rngs):
    self.kernel = param(rngs, (cin, cout), (None, None), 1.0 / math.sqrt(cin))
    self.bias = param(rngs, (cout,), (None,), zeros=True)

  def __call__(self, x):
    return x @ self.kernel[...] + self.bias[...]


class GroupNorm(nnx.Module):

  def __init__(self, channels, groups, *, rngs, eps=1e-6):
    self.scale = param(rngs, (channels,), ("norm",), ones=True)
    self.bias = param(rngs, (channels,), ("norm",), zeros=True)
    self.groups, self.eps = groups, eps

  def __call__(self, x):
    b, h, w, c = x.shape
    g = x.astype(jnp.float32).reshape(b, h, w, self.groups, c // self.groups)
    mean = g.mean(axis=(1, 2, 4), keepdims=True)
    var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
    y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class ResnetBlock(nnx.Module):
  """diffusers ResnetBlock2D without time embedding: norm-silu-conv twice, 1x1 shortcut on width change."""

  def __init__(self, cin, cout, groups, *, rngs):
    self.norm1 = GroupNorm(cin, groups, rngs=rngs)
    self.conv1 = Conv(cin, cout, 3, rngs=rngs)
    self.norm2 = GroupNorm(cout, groups, rngs=rngs)
    self.conv2 = Conv(cout, cout, 3, rngs=rngs)
    self.conv_shortcut = Conv(cin, cout, 1, rngs=rngs) if cin != cout else None

  def __call__(self, x):
    h = self.conv1(jax.nn.silu(self.norm1(x)))
    h = self.conv2(jax.nn.silu(self.norm2(h)))
    if self.conv_shortcut is not None:
      x = self.conv_shortcut(x)
    return x + h


class SelfAttention(nnx.Module):
  """Single-head spatial self-attention with a residual (diffusers Attention, heads=1)."""

  def __init__(self, channels, groups, *, rngs):
    self.group_norm = GroupNorm(channels, groups, rngs=rngs)
    self.to_q = Linear(channels, channels, rngs=rngs)
    self.to_k = Linear(channels, channels, rngs=rngs)
    self.to_v = Linear(channels, channels, rngs=rngs)
    self.to_out = nnx.List([Linear(channels, channels, rngs=rngs)])

  def __call__(self, x):
    b, h, w, c = x.shape
    t = self.group_norm(x).reshape(b, h * w, c)
    q, k, v = self.to_q(t), self.to_k(t), self.to_v(t)
    scores = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(c)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = self.to_out[0](jnp.einsum("bqk,bkc->bqc", probs, v))
    return x + out.reshape(b, h, w, c)


class MidBlock(nnx.Module):
  """resnet, attention, resnet (diffusers UNetMidBlock2D as used in the VAE)."""

  def __init__(self, channels, groups, *, rngs):
    self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs) for _ in range(2)])
    self.attentions = nnx.List([SelfAttention(channels, groups, rngs=rngs)])

  def __call__(self, x):
    x = self.resnets[0](x)
    x = self.attentions[0](x)
    return self.resnets[1](x)


class Downsample(nnx.Module):
  """Stride-2 3x3 conv after asymmetric (0, 1, 0, 1) padding."""

  def __init__(self, channels, *, rngs):
    self.conv = Conv(channels, channels, 3, rngs=rngs, stride=2, padding=((0, 1), (0, 1)))

  def __call__(self, x):
    return self.conv(x)


class Upsample(nnx.Module):
  """Nearest 2x upsample, then a 3x3 conv."""

  def __init__(self, channels, *, rngs):
    self.conv = Conv(channels, channels, 3, rngs=rngs)

  def __call__(self, x):
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class DownBlock(nnx.Module):

  def __init__(self, cin, cout, layers, groups, downsample, *, rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs)
                             for i in range(layers)])
    self.downsamplers = nnx.List([Downsample(cout, rngs=rngs)] if downsample else [])

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    for d in self.downsamplers:
      x = d(x)
    return x


class UpBlock(nnx.Module):

  def __init__(self, cin, cout, layers, groups, upsample, *, rngs):
    self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, rngs=rngs)
                             for i in range(layers)])
    self.upsamplers = nnx.List([Upsample(cout, rngs=rngs)] if upsample else [])

  def __call__(self, x):
    for r in self.resnets:
      x = r(x)
    for u in self.upsamplers:
      x = u(x)
    return x


class Encoder(nnx.Module):
  """Image [B, H, W, in] -> moments [B, H/f, W/f, 2 * latent], f = 2^(len(blocks) - 1)."""

  def __init__(self, cfg: VAEConfig, *, rngs):
    ch, g = cfg.block_out_channels, cfg.norm_num_groups
    self.conv_in = Conv(cfg.in_channels, ch[0], 3, rngs=rngs)
    self.down_blocks = nnx.List([
        DownBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block, g, i < len(ch) - 1, rngs=rngs)
        for i, c in enumerate(ch)])
    self.mid_block = MidBlock(ch[-1], g, rngs=rngs)
    self.conv_norm_out = GroupNorm(ch[-1], g, rngs=rngs)
    self.conv_out = Conv(ch[-1], 2 * cfg.latent_channels, 3, rngs=rngs)

  def __call__(self, x):
    x = self.conv_in(x)
    for block in self.down_blocks:
      x = block(x)
    x = self.mid_block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
  """Latent [B, h, w, latent] -> image [B, h*f, w*f, out]."""

  def __init__(self, cfg: VAEConfig, *, rngs):
    ch, g = tuple(reversed(cfg.block_out_channels)), cfg.norm_num_groups
    self.conv_in = Conv(cfg.latent_channels, ch[0], 3, rngs=rngs)
    self.mid_block = MidBlock(ch[0], g, rngs=rngs)
    self.up_blocks = nnx.List([
        UpBlock(ch[max(i - 1, 0)], c, cfg.layers_per_block + 1, g, i < len(ch) - 1, rngs=rngs)
        for i, c in enumerate(ch)])
    self.conv_norm_out = GroupNorm(ch[-1], g, rngs=rngs)
    self.conv_out = Conv(ch[-1], cfg.out_channels, 3, rngs=rngs)

  def __call__(self, z):
    x = self.mid_block(self.conv_in(z))
    for block in self.up_blocks:
      x = block(x)
    return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class AutoencoderKL(nnx.Module):
  """KL autoencoder: `encode` images in [-1, 1] to (mean, logvar), `decode` raw latents back.

  `to_latents` / `from_latents` apply the family's normalisation, the one the
  diffusion model sees: z = (mean - shift_factor) * scaling_factor.
  """

  def __init__(self, cfg: VAEConfig, *, rngs):
    self.config = cfg
    lat = cfg.latent_channels
    self.encoder = Encoder(cfg, rngs=rngs)
    self.decoder = Decoder(cfg, rngs=rngs)
    self.quant_conv = Conv(2 * lat, 2 * lat, 1, rngs=rngs) if cfg.use_quant_conv else None
    self.post_quant_conv = Conv(lat, lat, 1, rngs=rngs) if cfg.use_post_quant_conv else None

  def encode(self, x):
    """x: [B, H, W, in] in [-1, 1] -> (mean, logvar), each [B, H/f, W/f, latent]; logvar clipped to [-30, 20]."""
    moments = self.encoder(x)
    if self.quant_conv is not None:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    """Raw (unnormalised) latents [B, h, w, latent] -> images [B, h*f, w*f, out]."""
    if self.post_quant_conv is not None:
      z = self.post_quant_conv(z)
    return self.decoder(z)

  def to_latents(self, mean):
    return (mean - self.config.shift_factor) * self.config.scaling_factor

  def from_latents(self, z):
    return z / self.config.scaling_factor + self.config.shift_factor
