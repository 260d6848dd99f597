"""The mixed objectives, by model.image_loss:

  flow        next-token cross-entropy + lambda * flow matching (Transfusion)
  next_token  next-token cross-entropy over text and image codes alike
              (Chameleon / Emu3 early fusion, Janus-Pro generation)
  masked      next-token cross-entropy on text + w * cross-entropy on masked image
              codes (MaskGIT: each target image masks a cos(pi/2 u) share of its codes);
              with model.text_loss "masked" the text term is masked diffusion too
              (MMaDA / LLaDA: answer tokens masked with probability t, weight 1/t)
  mar         next-token cross-entropy + lambda * per-token flow matching of the masked
              tokens of each target image through a diffusion MLP on the transformer's
              output (Harmon / MAR: masked autoregression in random order)

Each term is averaged over its own global token count: text targets with
loss_mask = 1 for the cross-entropy, noised image tokens for the flow loss,
masked codes for the masked loss.
"""

import math

import jax
import jax.numpy as jnp

from unimm.batch import NOISED_IMAGE, TEXT
from unimm.errors import UserError
from unimm.models.layers import pop_router_stats
from unimm.objectives import flow
from unimm.parallel.sharding import constrain


def token_nll(h, head, targets, chunk=0):
  """Cross-entropy of the LM head per position, never holding more than `chunk` positions'
  logits: h [B, L, W] (final stream), head [W, V], targets: a tuple of [B, L] int arrays ->
  per target array (nll [B, L] f32, correct [B, L] bool: argmax == target).

  chunk > 0: the positions go through the head `chunk` at a time in a `jax.lax.scan` whose
  body is rematerialised, so neither the forward nor the backward holds [B, L, V] logits
  (the head's gradient accumulates in float32 across chunks); 0: all at once."""
  head32 = head.astype(jnp.float32)

  def one(h, targets):
    logits = jnp.einsum("bld,dv->blv", h, head32.astype(h.dtype), preferred_element_type=jnp.float32)
    logits = constrain(logits, ("batch", "length", "act_vocab"))
    lse = jax.nn.logsumexp(logits, axis=-1)
    best = jnp.argmax(logits, axis=-1)
    return tuple((lse - jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0], best == t)
                 for t in targets)

  b, length, w = h.shape
  if chunk <= 0 or chunk >= length:
    return one(h, targets)
  if length % chunk:
    raise UserError(f"model.ce_chunk={chunk} does not divide the sequence length {length}: use a "
                    "divisor of data.seq_len (or 0)")
  n = length // chunk
  split = lambda x: jnp.moveaxis(x.reshape(b, n, chunk, *x.shape[2:]), 1, 0)
  _, out = jax.lax.scan(lambda c, xs: (c, jax.checkpoint(one)(*xs)), None,
                        (split(h), tuple(split(t) for t in targets)))
  return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(b, length), out)


def next_token_loss(nll, correct, mask):
  """(mean nll over `mask`, its count, correct predictions under it) from token_nll's output."""
  count = jnp.sum(mask)
  return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count, jnp.sum(correct * mask)


def _hidden(model, batch, tokens, patches, t):
  return model.hidden(tokens, patches, t, batch["modality"], batch["image_ids"],
                      batch["patch_index"], batch["segment_ids"], batch["positions"])[0]


def _nll(model, h, cfg, *targets):
  return token_nll(h, model.head(), targets, int(getattr(cfg.model, "ce_chunk", 0)))


def flow_loss(v_pred, v_target, noised, t=None, cfg=None):
  """(mean squared velocity error over the `noised` tokens, their count); with t and cfg, an x0
  prediction's error at small t is weighted by at most flow.max_weight (flow.loss_scale)."""
  err = jnp.mean(jnp.square(v_pred - v_target), axis=-1)
  if cfg is not None:
    err = err * flow.loss_scale(t, cfg.flow, cfg.model.prediction)
  count = jnp.sum(noised)
  return jnp.sum(err * noised) / jnp.maximum(count, 1.0), count


def unified_loss(model, batch, rng, cfg):
  """The loss of model.image_loss on `batch`, plus the routers' losses of MoE blocks:
  (loss, metrics)."""
  kind = getattr(cfg.model, "image_loss", "flow")
  if kind == "masked":
    loss, metrics = masked_loss(model, batch, rng, cfg)
  elif kind == "mar":
    loss, metrics = mar_loss(model, batch, rng, cfg)
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
  stats = pop_router_stats(model)  # one dict of [routed blocks, ...] rows (model.hidden)
  if not stats:
    return loss, metrics
  (aux,) = stats
  lb, z = jnp.mean(aux["lb_loss"]), jnp.mean(aux["z_loss"])
  loss = loss + moe.lb_weight * lb + moe.z_weight * z
  block_load = aux["load"]  # [MoE blocks, E] (not logged)
  load, experts = jnp.mean(block_load, axis=0), block_load.shape[1]
  metrics = dict(metrics, loss=loss, moe_lb=lb, moe_z=z, moe_entropy=jnp.mean(aux["entropy"]),
                 moe_max_load=jnp.max(block_load) * experts, moe_block_load=block_load,
                 moe_dropped=jnp.sum(aux["dropped"]) / jnp.sum(aux["assignments"]))
  metrics.update({f"moe_load/{e}": load[e] for e in range(experts)})
  return loss, metrics


def next_token_only_loss(model, batch, cfg):
  """Early fusion: one cross-entropy over every target with loss (text and image codes);
  ce_image / image_accuracy report the code targets alone."""
  tokens = batch["tokens"]
  h = _hidden(model, batch, tokens, batch["patches"], jnp.zeros(tokens.shape))
  ((nll, correct),) = _nll(model, h, cfg, batch["targets"])
  mask = batch["loss_mask"].astype(jnp.float32)
  ce, n, n_correct = next_token_loss(nll, correct, mask)
  is_code = (batch["targets"] >= model.code_offset).astype(jnp.float32) * mask
  ce_image, n_image, correct_image = next_token_loss(nll, correct, is_code)
  return ce, {"loss": ce, "ce": ce, "ce_image": ce_image, "text_tokens": n - n_image,
              "image_tokens": n_image, "token_accuracy": n_correct / jnp.maximum(n, 1.0),
              "image_accuracy": correct_image / jnp.maximum(n_image, 1.0)}


def mask_ratio(u):
  """MaskGIT's cosine schedule: the share of an image's codes masked at u in [0, 1]."""
  return jnp.cos(0.5 * math.pi * u)


T_EPS = 1e-3  # text diffusion: t ~ U(T_EPS, 1), so that the 1/t weight stays bounded (LLaDA)


def masked_codes(rng, batch):
  """MaskGIT's masking of the target images (NOISED_IMAGE positions holding codes): per image
  u ~ U(0, 1), each code masked with probability cos(pi/2 u) (Bernoulli per code, so the
  masked count is cos(pi/2 u) N in expectation): [B, L] bool."""
  rng_u, rng_m = jax.random.split(rng)
  modality, tokens = batch["modality"], batch["tokens"]
  u = flow.per_image_value(jax.random.uniform(rng_u, tokens.shape), batch["segment_ids"],
                           batch["image_ids"], modality)
  return (modality == NOISED_IMAGE) & (jax.random.uniform(rng_m, tokens.shape) < mask_ratio(u))


def answer_tokens(batch):
  """[B, L] bool: the text tokens text diffusion predicts: tokens with LM loss (loss_mask at
  the position before, same document) that no target image of their document follows (the
  text before a target image, a t2i or edit prompt, is its condition)."""
  seg, modality = batch["segment_ids"], batch["modality"]
  b, l = seg.shape
  shift = lambda x, fill: jnp.concatenate([jnp.full((b, 1), fill, x.dtype), x[:, :-1]], axis=1)
  lm = (shift(batch["loss_mask"], 0.0) > 0) & (shift(seg, -1) == seg)
  idx = jnp.broadcast_to(jnp.arange(l), (b, l))
  nxt = jax.lax.cummin(jnp.where(modality == NOISED_IMAGE, idx, l), axis=1, reverse=True)
  followed = (nxt < l) & (jnp.take_along_axis(seg, jnp.minimum(nxt, l - 1), axis=1) == seg)
  return lm & (modality == TEXT) & ~followed & (seg > 0)


def per_document_value(values, segment_ids):
  """values [B, L] -> each token takes the value at its document's first token."""
  l = segment_ids.shape[1]
  prev = jnp.pad(segment_ids, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  first = jax.lax.cummax(jnp.where(segment_ids != prev, jnp.arange(l)[None, :], 0), axis=1)
  return jnp.take_along_axis(values, first, axis=1)


def masked_text(rng, batch):
  """Text diffusion's forward process: per document t ~ U(T_EPS, 1), each answer token masked
  with probability t: (answer [B, L] bool, masked [B, L] bool, t [B, L] float32)."""
  rng_t, rng_m = jax.random.split(rng)
  shape = batch["tokens"].shape
  t = per_document_value(jax.random.uniform(rng_t, shape, minval=T_EPS, maxval=1.0),
                         batch["segment_ids"])
  answer = answer_tokens(batch)
  return answer, answer & (jax.random.uniform(rng_m, shape) < t), t


def diffusion_text_loss(nll, correct, answer, masked, t):
  """The masked-diffusion ELBO over the answer tokens: sum over masked tokens of nll / t,
  divided by the number of answer tokens (its expectation over the masks is the mean nll of
  every answer token at that t: a token is masked with probability t). Returns (loss, answer
  count, correct predictions among the masked, masked count)."""
  n = jnp.sum(answer.astype(jnp.float32))
  m = masked.astype(jnp.float32)
  loss = jnp.sum(nll * m / t) / jnp.maximum(n, 1.0)
  return loss, n, jnp.sum(correct * m), jnp.sum(m)


def metric_path_logits(emb, x1, t, beta_scale, beta_power):
  """FUDOKI's metric-induced probability path over a vocabulary of V tokens:
  log p_t(x | x1) = -beta(t) d(x, x1) + const, d = 1 - cos(e_x, e_x1) of the embeddings emb
  [V, W], beta(t) = beta_scale ((1 - t) / t)^beta_power: uniform at t = 1 (noise), all on x1
  as t -> 0. x1, t: [...] -> logits [..., V]."""
  e = emb.astype(jnp.float32)
  e = e * jax.lax.rsqrt(jnp.sum(e * e, -1, keepdims=True) + 1e-12)
  dist = 1.0 - jnp.take(e, x1, axis=0) @ e.T
  beta = beta_scale * ((1.0 - t) / t) ** beta_power
  return -beta[..., None] * dist


def path_beta_scale(text_flow, vocab):
  return float(text_flow.beta_scale) or math.log(vocab)


def metric_path_text(rng, batch, emb, text_flow):
  """FUDOKI's forward process on the answer tokens: per document t ~ U(T_EPS, 1), each answer
  token x1 replaced by a draw of p_t(. | x1) (`metric_path_logits` over the rows of emb, the
  text vocabulary): (answer [B, L] bool, x_t [B, L] int32, t [B, L])."""
  rng_t, rng_x = jax.random.split(rng)
  tokens = batch["tokens"]
  t = per_document_value(jax.random.uniform(rng_t, tokens.shape, minval=T_EPS, maxval=1.0),
                         batch["segment_ids"])
  answer = answer_tokens(batch)
  vocab = emb.shape[0]
  logits = metric_path_logits(emb, jnp.minimum(tokens, vocab - 1), t,
                              path_beta_scale(text_flow, vocab), float(text_flow.beta_power))
  x_t = jax.random.categorical(rng_x, logits).astype(tokens.dtype)
  return answer, jnp.where(answer, x_t, tokens), t


def masked_loss(model, batch, rng, cfg):
  """MaskGIT on the target images (`masked_codes`): the model sees the mask id there and is
  trained to predict the code, loss on masked codes only. Text keeps next-token loss, or is
  discrete diffusion (the model attends bidirectionally within each document): model.text_loss
  "masked", absorbing-state (`masked_text`, `diffusion_text_loss`), or "flow", FUDOKI's discrete
  flow matching: answer tokens drawn from the metric path (`metric_path_text`, over the text
  rows of the frozen-in-the-loss token table), cross-entropy of the clean token at every answer
  position."""
  rng_img, rng_txt = jax.random.split(rng)
  tokens = batch["tokens"]
  masked = masked_codes(rng_img, batch)
  text_loss = getattr(cfg.model, "text_loss", "next_token")
  inputs, hide = tokens, masked
  if text_loss == "masked":
    answer, text_masked, t = masked_text(rng_txt, batch)
    hide = masked | text_masked
  elif text_loss == "flow":
    emb = jax.lax.stop_gradient(model.embed.value[:model.code_offset])
    answer, inputs, t = metric_path_text(rng_txt, batch, emb, cfg.model.text_flow)
  inputs = jnp.where(hide, model.mask_id, inputs)
  h = _hidden(model, batch, inputs, batch["patches"], jnp.zeros(tokens.shape))
  if text_loss == "masked":  # every term predicts the token at its own position
    ((m_nll, m_correct),) = _nll(model, h, cfg, tokens)
    ce, n_text, n_correct, n_scored = diffusion_text_loss(m_nll, m_correct, answer, text_masked, t)
  elif text_loss == "flow":
    ((m_nll, m_correct),) = _nll(model, h, cfg, tokens)
    ce, n_text, n_correct = next_token_loss(m_nll, m_correct, answer.astype(jnp.float32))
    n_scored = n_text
  else:
    (nll, correct), (m_nll, m_correct) = _nll(model, h, cfg, batch["targets"], tokens)
    ce, n_text, n_correct = next_token_loss(nll, correct, batch["loss_mask"].astype(jnp.float32))
    n_scored = n_text
  mce, n_masked, m_correct = next_token_loss(m_nll, m_correct, masked.astype(jnp.float32))
  loss = ce + cfg.model.mask_loss_weight * mce
  return loss, {"loss": loss, "ce": ce, "ce_image": mce, "text_tokens": n_text,
                "image_tokens": n_masked, "token_accuracy": n_correct / jnp.maximum(n_scored, 1.0),
                "image_accuracy": m_correct / jnp.maximum(n_masked, 1.0)}


def mar_mask_ratio(rng, shape, mask_min):
  """MAR's share of an image's tokens to mask: N(1, 0.25) truncated to [mask_min, 1]."""
  return 1.0 + 0.25 * jax.random.truncated_normal(rng, (mask_min - 1.0) / 0.25, 0.0, shape)


def mar_masked(rng, batch, mask_min):
  """Which target-image tokens MAR masks: per image a share r (`mar_mask_ratio`), each token
  masked with probability r (a random order whose first r N are masked, in expectation)."""
  rng_r, rng_m = jax.random.split(rng)
  modality, shape = batch["modality"], batch["tokens"].shape
  r = flow.per_image_value(mar_mask_ratio(rng_r, shape, mask_min), batch["segment_ids"],
                           batch["image_ids"], modality)
  return (modality == NOISED_IMAGE) & (jax.random.uniform(rng_m, shape) < r)


def mar_hidden(model, batch, patches, masked):
  """The transformer's output when `masked` image tokens show only the mask embedding and the
  others their clean patches (`patches`)."""
  patches = jnp.where(masked[..., None], 0.0, patches)
  return model.hidden(batch["tokens"], patches, jnp.zeros(masked.shape), batch["modality"],
                      batch["image_ids"], batch["patch_index"], batch["segment_ids"],
                      batch["positions"], replace=masked,
                      embeds=model.mask_embeddings(batch["modality"], batch["patch_index"]))[0]


def mar_rows(rng, masked, cap):
  """[B, cap] positions of each row where MAR's MLP runs: the masked ones first, in a random
  order (a uniform random subset of them when a row holds more than `cap`), then others (whose
  loss weight is 0); None when cap is 0 or not below the row length (every position)."""
  if not cap or cap >= masked.shape[1]:
    return None
  key = jnp.where(masked, jax.random.uniform(rng, masked.shape), 2.0)
  return jnp.argsort(key, axis=1)[:, :cap]


def mar_loss(model, batch, rng, cfg):
  """Harmon / MAR: the masked tokens of each target image (`mar_masked`) are predicted from
  the transformer's output z by the per-token diffusion MLP, flow matching with
  model.mar.t_repeat times per token (t as flow.* samples it, per token); loss averaged over
  the masked tokens and draws. The MLP runs at model.mar.max_tokens positions of each row
  (`mar_rows`), not on the text. Text keeps next-token loss."""
  rng_mask, rng_t, rng_eps, rng_pick = jax.random.split(rng, 4)
  m = cfg.model.mar
  masked = mar_masked(rng_mask, batch, m.mask_min)
  x0 = batch["patches"].astype(jnp.float32)
  h = mar_hidden(model, batch, x0, masked)
  k = int(m.t_repeat)
  # (t and eps are drawn at every position, then gathered: a cap at or above each row's count of
  # masked tokens gives exactly the uncapped loss)
  t = flow.sample_time(rng_t, (k,) + masked.shape, cfg.flow, cfg.data.image_size,
                       tokens=model.patch_pos.value.shape[0])
  eps = jax.random.normal(rng_eps, (k,) + x0.shape, jnp.float32)
  z, w = h, masked
  idx = mar_rows(rng_pick, masked, int(getattr(m, "max_tokens", 0)))
  if idx is not None:
    w, t = jnp.take_along_axis(masked, idx, 1), jnp.take_along_axis(t, idx[None], 2)
    x0, z = (jnp.take_along_axis(a, idx[..., None], 1) for a in (x0, h))
    eps = jnp.take_along_axis(eps, idx[None, ..., None], 2)
  x_t = flow.add_noise(x0[None], eps, t)
  v = flow.velocity(model.mar_head(x_t, t, z[None]), x_t, t, cfg.model.prediction, cfg.flow.t_min)
  fm, n_img = flow_loss(v, eps - x0[None], jnp.broadcast_to(w, t.shape).astype(jnp.float32), t, cfg)
  ((nll, correct),) = _nll(model, h, cfg, batch["targets"])
  ce, n_text, n_correct = next_token_loss(nll, correct, batch["loss_mask"].astype(jnp.float32))
  loss = ce + cfg.flow.loss_weight * fm
  return loss, {"loss": loss, "ce": ce, "flow": fm, "text_tokens": n_text,
                "image_tokens": n_img / k, "token_accuracy": n_correct / jnp.maximum(n_text, 1.0)}


def flow_matching_loss(model, batch, rng, cfg):
  """Noises the target images of `batch`, runs the model, returns (loss, metrics)."""
  rng_t, rng_eps = jax.random.split(rng)
  noised = batch["modality"] == NOISED_IMAGE
  t = flow.per_image_time(rng_t, batch["segment_ids"], batch["image_ids"], batch["modality"],
                          cfg.flow, cfg.data.image_size, tokens=model.patch_pos.value.shape[0])
  x0 = batch["patches"].astype(jnp.float32)
  eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
  x_t = jnp.where(noised[..., None], flow.add_noise(x0, eps, t), x0)
  h = _hidden(model, batch, batch["tokens"], x_t, t)
  pred = model.flow_out(h, x_t, batch["segment_ids"], batch["modality"], batch["image_ids"])
  v_pred = flow.velocity(pred, x_t, t, cfg.model.prediction, cfg.flow.t_min)
  ((nll, correct),) = _nll(model, h, cfg, batch["targets"])
  ce, n_text, n_correct = next_token_loss(nll, correct, batch["loss_mask"].astype(jnp.float32))
  fm, n_img = flow_loss(v_pred, eps - x0, noised.astype(jnp.float32), t, cfg)
  loss = ce + cfg.flow.loss_weight * fm
  metrics = {"loss": loss, "ce": ce, "flow": fm, "text_tokens": n_text, "image_tokens": n_img,
             "token_accuracy": n_correct / jnp.maximum(n_text, 1.0)}
  return loss, metrics


def mmdit_loss(model, batch, rng, cfg):
  """Flow matching of the MMDiT (`unimm.models.conditioning.DiffusionModel`) on the first target
  image of each row (one document per row): t per row (logit-normal, shifted by flow.shift_kind),
  x_t = (1 - t) x0 + t eps, loss |v - (eps - x0)|^2 averaged over the target tokens.
  text_cut counts the rows whose text the text stream cuts (model.condition.text_len);
  edit_rows / edit_unaligned count the rows whose target has a condition image before it and,
  of those, the ones whose source has another size (never used misaligned: it is left out)."""
  rng_t, rng_eps = jax.random.split(rng)
  idx, ok = model.target_tokens(batch)
  x0 = jnp.take_along_axis(batch["patches"], idx[..., None], axis=1).astype(jnp.float32)
  b = x0.shape[0]
  t = flow.sample_time(rng_t, (b,), cfg.flow, cfg.data.image_size, tokens=model.tokens)
  eps = jax.random.normal(rng_eps, x0.shape, jnp.float32)
  x_t = flow.add_noise(x0, eps, t[:, None])
  pred = model(batch, x_t, t)
  t_tok = jnp.broadcast_to(t[:, None], ok.shape)
  v_pred = flow.velocity(pred, x_t, t_tok, cfg.model.prediction, cfg.flow.t_min)
  fm, n_img = flow_loss(v_pred, eps - x0, ok.astype(jnp.float32), t_tok, cfg)
  metrics = {"loss": fm, "flow": fm, "image_tokens": n_img}
  metrics.update(model.row_counts(batch))
  loss = fm
  if model.encoder_kind == "seed" and cfg.model.condition.recon_weight:
    recon = model.seed.recon_loss(x0, ok[:, 0], model.seed.sown_codes())
    loss = fm + cfg.model.condition.recon_weight * recon
    metrics.update(loss=loss, recon=recon)
  return loss, metrics
