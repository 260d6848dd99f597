"""The mixed objectives, by model.image_loss:

  flow        next-token cross-entropy + lambda * flow matching (Transfusion)
  next_token  next-token cross-entropy over text and image codes alike
              (Chameleon / Emu3 early fusion, Janus-Pro generation)
  masked      next-token cross-entropy on text + w * cross-entropy on masked image
              codes (MaskGIT: each target image masks a cos(pi/2 u) share of its codes)

Each term is averaged over its own global token count: text targets with
loss_mask = 1 for the cross-entropy, noised image tokens for the flow loss,
masked codes for the masked loss.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.batch import NOISED_IMAGE
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
  """The loss of model.image_loss on `batch`, plus the routers' losses of MoE blocks:
  (loss, metrics)."""
  kind = getattr(cfg.model, "image_loss", "flow")
  if kind == "masked":
    loss, metrics = masked_loss(model, batch, rng, cfg)
  elif kind == "next_token":
    loss, metrics = next_token_only_loss(model, batch, cfg)
  else:
    loss, metrics = flow_matching_loss(model, batch, rng, cfg)
  return add_router_losses(model, loss, metrics, cfg.model.moe)


def add_router_losses(model, loss, metrics, moe):
  """Adds lb_weight * load-balancing + z_weight * z-loss (each averaged over the MoE
  blocks of the forward pass that just ran) and the routing statistics: moe_load/{e}
  (share of assignments per expert, averaged over blocks), moe_max_load (the largest
  max/mean expert load of any block), moe_dropped (share of dropped assignments),
  moe_entropy (mean router entropy)."""
  sown = nnx.pop(model, nnx.Intermediate)
  aux = jax.tree.leaves(sown, is_leaf=lambda x: isinstance(x, dict) and "lb_loss" in x)
  aux = [a for a in aux if isinstance(a, dict)]
  if not aux:
    return loss, metrics
  mean = lambda k: sum(a[k] for a in aux) / len(aux)
  lb, z = mean("lb_loss"), mean("z_loss")
  loss = loss + moe.lb_weight * lb + moe.z_weight * z
  block_load = jnp.stack([a["load"] for a in aux])  # [MoE blocks, E] (not logged)
  load, experts = jnp.mean(block_load, axis=0), block_load.shape[1]
  metrics = dict(metrics, loss=loss, moe_lb=lb, moe_z=z, moe_entropy=mean("entropy"),
                 moe_max_load=jnp.max(block_load) * experts, moe_block_load=block_load,
                 moe_dropped=sum(a["dropped"] for a in aux) / sum(a["assignments"] for a in aux))
  metrics.update({f"moe_load/{e}": load[e] for e in range(experts)})
  return loss, metrics


def _forward(model, batch, tokens, t):
  return model(tokens, batch["patches"], t, batch["modality"], batch["image_ids"],
               batch["patch_index"], batch["segment_ids"], batch["positions"])


def next_token_only_loss(model, batch, cfg):
  """Early fusion: one cross-entropy over every target with loss (text and image codes);
  ce_image / image_accuracy report the code targets alone."""
  del cfg
  logits, _, _ = _forward(model, batch, batch["tokens"], jnp.zeros(batch["tokens"].shape))
  mask = batch["loss_mask"].astype(jnp.float32)
  ce, n, n_correct = next_token_loss(logits, batch["targets"], mask)
  is_code = (batch["targets"] >= model.code_offset).astype(jnp.float32) * mask
  ce_image, n_image, correct_image = next_token_loss(logits, batch["targets"], is_code)
  return ce, {"loss": ce, "ce": ce, "ce_image": ce_image, "text_tokens": n - n_image,
              "image_tokens": n_image, "token_accuracy": n_correct / jnp.maximum(n, 1.0),
              "image_accuracy": correct_image / jnp.maximum(n_image, 1.0)}


def mask_ratio(u):
  """MaskGIT's cosine schedule: the share of an image's codes masked at u in [0, 1]."""
  return jnp.cos(0.5 * math.pi * u)


def masked_loss(model, batch, rng, cfg):
  """MaskGIT on the target images (NOISED_IMAGE positions holding codes): per image
  u ~ U(0, 1), each code masked with probability cos(pi/2 u) (Bernoulli per code, so the
  masked count is cos(pi/2 u) N in expectation); the model sees the mask id there and is
  trained to predict the code, loss on masked codes only. Text keeps next-token loss."""
  rng_u, rng_m = jax.random.split(rng)
  modality, tokens = batch["modality"], batch["tokens"]
  target = modality == NOISED_IMAGE
  u = flow.per_image_value(jax.random.uniform(rng_u, tokens.shape), batch["segment_ids"],
                           batch["image_ids"], modality)
  masked = target & (jax.random.uniform(rng_m, tokens.shape) < mask_ratio(u))
  inputs = jnp.where(masked, model.mask_id, tokens)
  logits, _, _ = _forward(model, batch, inputs, jnp.zeros(tokens.shape))
  ce, n_text, n_correct = next_token_loss(logits, batch["targets"],
                                          batch["loss_mask"].astype(jnp.float32))
  mce, n_masked, m_correct = next_token_loss(logits, tokens, masked.astype(jnp.float32))
  loss = ce + cfg.model.mask_loss_weight * mce
  return loss, {"loss": loss, "ce": ce, "ce_image": mce, "text_tokens": n_text,
                "image_tokens": n_masked, "token_accuracy": n_correct / jnp.maximum(n_text, 1.0),
                "image_accuracy": m_correct / jnp.maximum(n_masked, 1.0)}


def flow_matching_loss(model, batch, rng, cfg):
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
