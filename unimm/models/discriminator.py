"""PatchGAN discriminator for tokenizer training (taming-transformers NLayerDiscriminator).

conv 4x4 stride 2 + LeakyReLU(0.2), then `n_layers - 1` more stride-2 convs and one
stride-1 conv (each norm + LeakyReLU), channels `channels * min(2^i, 8)`, and a last
stride-1 4x4 conv to one logit per patch. Padding 1 everywhere, as taming.

Norm: GroupNorm (or none) instead of taming's BatchNorm, so a batch's logits do not
depend on the other images in it and there are no running statistics to carry.
Conv kernels start from N(0, 0.02), as taming's weights_init.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.errors import UserError
from unimm.models.layers import param
from unimm.models.vae import GroupNorm

NORMS = ("group", "none")
LOSSES = ("hinge", "vanilla")


class _Conv(nnx.Module):
  """4x4 conv, padding 1, N(0, 0.02) kernel."""

  def __init__(self, cin, cout, stride, *, rngs):
    self.kernel = param(rngs, (4, 4, cin, cout), (None, None, None, None), 0.02)
    self.bias = param(rngs, (cout,), (None,), zeros=True)
    self.stride = stride

  def __call__(self, x):
    y = jax.lax.conv_general_dilated(x.astype(jnp.float32), self.kernel[...],
                                     (self.stride, self.stride), ((1, 1), (1, 1)),
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + self.bias[...]


def _groups(channels):
  """The largest divisor of `channels` that is at most 32."""
  return max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)


class PatchDiscriminator(nnx.Module):
  """Images [B, H, W, 3] in [-1, 1] -> patch logits [B, h, w, 1]."""

  def __init__(self, *, channels=64, n_layers=3, norm="group", in_channels=3, rngs):
    if norm not in NORMS:
      raise UserError(f"discriminator norm '{norm}': use one of {', '.join(NORMS)}")
    if int(n_layers) < 1 or int(channels) < 1:
      raise UserError(f"discriminator needs n_layers >= 1 and channels >= 1, got {n_layers}, "
                      f"{channels}")
    widths = [int(channels) * min(2 ** i, 8) for i in range(int(n_layers) + 1)]
    self.convs = nnx.List([_Conv(in_channels, widths[0], 2, rngs=rngs)])
    self.norms = nnx.List([])
    for i in range(1, int(n_layers) + 1):
      stride = 2 if i < int(n_layers) else 1
      self.convs.append(_Conv(widths[i - 1], widths[i], stride, rngs=rngs))
      self.norms.append(GroupNorm(widths[i], _groups(widths[i]), rngs=rngs) if norm == "group"
                        else None)
    self.out = _Conv(widths[-1], 1, 1, rngs=rngs)

  def __call__(self, x):
    h = jax.nn.leaky_relu(self.convs[0](x), 0.2)
    for conv, norm in zip(self.convs[1:], self.norms):
      h = conv(h)
      h = jax.nn.leaky_relu(norm(h) if norm is not None else h, 0.2)
    return self.out(h)


def discriminator_loss(logits_real, logits_fake, kind="hinge"):
  """taming's hinge_d_loss / vanilla_d_loss: 0.5 (real term + fake term)."""
  if kind == "hinge":
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


def generator_loss(logits_fake):
  """-E[D(G(z))], taming's generator loss for both hinge and vanilla."""
  return -jnp.mean(logits_fake)


def adaptive_weight(rec_grad, gan_grad, max_weight=1e4):
  """taming's calculate_adaptive_weight: ||grad rec|| / (||grad gan|| + 1e-4), clipped to
  [0, max_weight], no gradient; the gradients are w.r.t. the decoder's last layer."""
  w = jnp.linalg.norm(rec_grad) / (jnp.linalg.norm(gan_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))


def output_size(size, n_layers):
  """Spatial size of the logits for inputs of `size` pixels."""
  for _ in range(int(n_layers)):
    size = math.floor((size + 2 - 4) / 2) + 1
  return size - 2
