"""The mixed objective: next-token cross-entropy + lambda * flow matching.

Each term is averaged over its own global token count: text targets with
loss_mask = 1 for the cross-entropy, noised image tokens for the flow loss.
"""

import jax
import jax.numpy as jnp

from unimm.data.document import NOISED_IMAGE
from unimm.objectives import flow


def next_token_loss(logits, targets, mask):
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  count = jnp.sum(mask)
  correct = (jnp.argmax(logits, axis=-1) == targets) * mask
  return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count, jnp.sum(correct)


def flow_loss(v_pred, v_target, noised):
  err = jnp.mean(jnp.square(v_pred - v_target), axis=-1)
  count = jnp.sum(noised)
  return jnp.sum(err * noised) / jnp.maximum(count, 1.0), count


def unified_loss(model, batch, rng, cfg):
  """Noises the target images of `batch`, runs the model, returns (loss, metrics)."""
  rng_t, rng_eps = jax.random.split(rng)
  noised = batch["modality"] == NOISED_IMAGE
  t = flow.per_image_time(rng_t, batch["segment_ids"], batch["image_ids"], batch["modality"],
                          cfg.flow, cfg.data.image_size)
  x0 = batch["patches"].astype(jnp.float32)
  eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
  x_t = jnp.where(noised[..., None], flow.add_noise(x0, eps, t), x0)
  logits, out, _ = model(batch["tokens"], x_t, t, batch["modality"], batch["image_ids"],
                         batch["patch_index"], batch["segment_ids"], batch["positions"])
  v_pred = flow.velocity(out, x_t, t, cfg.model.prediction, cfg.flow.t_min)
  ce, n_text, n_correct = next_token_loss(logits, batch["targets"], batch["loss_mask"].astype(jnp.float32))
  fm, n_img = flow_loss(v_pred, eps - x0, noised.astype(jnp.float32))
  loss = ce + cfg.flow.loss_weight * fm
  metrics = {"loss": loss, "ce": ce, "flow": fm, "text_tokens": n_text, "image_tokens": n_img,
             "token_accuracy": n_correct / jnp.maximum(n_text, 1.0)}
  return loss, metrics
