"""Rectified flow, in unimm's one convention.

t = 1 is noise: x_t = (1 - t) x0 + t eps, velocity target v = eps - x0, and the
Euler sampler runs t from 1 to 0 with x <- x + (t_next - t) v.
Training t is logit-normal, shifted toward noise for larger images:
t' = a t / (1 + (a - 1) t), with flow.shift_kind
  "constant" (SD3)  a = shift * sqrt(pixels / base pixels)
  "flux"            a = e^mu, mu linear in the image's token count: base_shift at 256 tokens,
                    max_shift at 4096 (FLUX's e^mu / (e^mu + 1/t - 1) is the same map)
and flow.unshifted_prob of the draws left unshifted.
"""

import math

import jax
import jax.numpy as jnp

from unimm.batch import NOISED_IMAGE


def resolution_shift(flow_cfg, image_size, tokens=None):
  """The shift a for images of image_size pixels a side (tokens: their token count, for
  shift_kind "flux")."""
  if getattr(flow_cfg, "shift_kind", "constant") == "flux":
    if tokens is None:
      raise ValueError("the flux shift needs the image's token count")
    mu = flow_cfg.base_shift + (flow_cfg.max_shift - flow_cfg.base_shift) * (tokens - 256) / (4096 - 256)
    return math.exp(mu)
  return flow_cfg.shift * (image_size / flow_cfg.base_image_size)


def shift_time(t, alpha):
  return alpha * t / (1.0 + (alpha - 1.0) * t)


def sample_time(rng, shape, flow_cfg, image_size, tokens=None):
  """Logit-normal t, shifted; with probability flow.unshifted_prob a draw keeps its unshifted
  t (a mixture of the two densities: the shift's time near noise, and the clean end's detail)."""
  u = flow_cfg.t_mean + flow_cfg.t_std * jax.random.normal(rng, shape)
  alpha = resolution_shift(flow_cfg, image_size, tokens)
  p = float(getattr(flow_cfg, "unshifted_prob", 0.0))
  if p > 0.0:
    alpha = jnp.where(jax.random.bernoulli(jax.random.fold_in(rng, 1), p, shape), 1.0, alpha)
  return shift_time(jax.nn.sigmoid(u), alpha)


def per_image_time(rng, segment_ids, image_ids, modality, flow_cfg, image_size, tokens=None):
  """One t per noised image instance, broadcast over its tokens; 0 elsewhere."""
  t_tok = sample_time(rng, segment_ids.shape, flow_cfg, image_size, tokens)
  return per_image_value(t_tok, segment_ids, image_ids, modality)


def per_image_value(values, segment_ids, image_ids, modality):
  """values [B, L] -> each noised image's tokens all take the value at the image's first
  token (a running max over image start positions finds it); 0 elsewhere."""
  B, L = segment_ids.shape
  prev_seg = jnp.pad(segment_ids, ((0, 0), (1, 0)))[:, :-1]
  prev_img = jnp.pad(image_ids, ((0, 0), (1, 0)))[:, :-1]
  noised = modality == NOISED_IMAGE
  start = noised & ((segment_ids != prev_seg) | (image_ids != prev_img))
  first = jax.lax.cummax(jnp.where(start, jnp.arange(L)[None, :], 0), axis=1)
  return jnp.where(noised, jnp.take_along_axis(values, first, axis=1), 0.0)


def add_noise(x0, eps, t):
  """x_t = (1 - t) x0 + t eps; t broadcasts over the patch dimension."""
  t = t[..., None]
  return (1.0 - t) * x0 + t * eps


def velocity(pred, x_t, t, prediction, t_min):
  """The network's output as a velocity: as is, or from an x0 prediction,
  v = (x_t - x0_hat) / t with t clamped below at t_min."""
  if prediction == "velocity":
    return pred
  if prediction == "x0":
    return (x_t - pred) / jnp.maximum(t, t_min)[..., None]
  raise ValueError(f"model.prediction must be 'velocity' or 'x0', got {prediction!r}")


def loss_scale(t, flow_cfg, prediction):
  """The velocity error of an x0 prediction is its x0 error times 1 / t^2 (v = (x_t - x0) / t):
  400 at t = 0.05. flow.max_weight (> 0) caps that weight, scaling the error by
  min(1, max_weight t^2), so that the rare draws near t = 0 (flow.unshifted_prob) do not
  outweigh, through gradient clipping, the rest of the batch. 1 for velocity predictions."""
  cap = float(getattr(flow_cfg, "max_weight", 0.0))
  if prediction != "x0" or cap <= 0.0:
    return 1.0
  return jnp.minimum(1.0, cap * jnp.square(jnp.maximum(t, flow_cfg.t_min)))


def euler_schedule(steps, alpha):
  """t from 1 to 0 in `steps` Euler steps, shifted like training."""
  return shift_time(jnp.linspace(1.0, 0.0, steps + 1), alpha)
