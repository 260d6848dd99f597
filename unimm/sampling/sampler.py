"""Sampling from the unified model: text to image, image to text, edits.

- images: Euler ODE from t=1 (noise) to t=0 with classifier-free guidance,
  v = v_uncond + w (v_cond - v_uncond); the unconditional branch drops the
  text that precedes the target image, as condition dropout did in training.
- text: greedy or top-p decoding with a KV cache; prompts are left-padded so
  that every row of a batch decodes into the same cache slot.
- vq codes, next_token (early fusion): the image's codes one by one after
  `<boi>` with the KV cache, classifier-free guidance on the logits
  l = l_u + w (l_c - l_u), temperature / top-k sampling among the codes.
- vq codes, masked (MaskGIT): all codes start as the mask id; each of
  sample.mask_steps steps predicts every masked code (guided logits), keeps
  the most confident and re-masks the rest, cos(pi/2 s/T) of the codes masked
  after step s.
- continuous tokens, mar (Harmon / MAR): all masked; each step draws every
  masked token with the per-token diffusion MLP (Euler, CFG on its velocity)
  and keeps the next ones of a random order (cosine schedule).
- text diffusion (model.text_loss "masked" / "flow"): an answer block after
  the prompt, unmasked most confident first (MMaDA) or drawn anew from the
  metric path at decreasing t (FUDOKI) over sample.text_steps steps.

Prompts are documents (`unimm.data.document`) encoded exactly as in training:
vae / vq images by the image tokenizer on the device (`encode_images`).
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.data import document as D
from unimm.data.pipeline import encode_document
from unimm.errors import UserError
from unimm.models.image_tokenizer import encode_images, frozen_variables
from unimm.objectives import flow
from unimm.objectives import losses

MASKGIT_CHOICE_TEMPERATURE = 4.5  # MaskGIT's Gumbel noise on the confidence at step 0

SEQ_KEYS = ("tokens", "targets", "patches", "modality", "image_ids", "patch_index", "pixels",
            "encode", "segment_ids", "positions")
_DOC_KEYS = SEQ_KEYS[:-2]


def _stack(encoded, length, left_pad):
  """Pads encoded documents to `length` and stacks them; segment 0 marks padding."""
  n = len(encoded)
  out = {k: np.zeros((n, length) + encoded[0][k].shape[1:], encoded[0][k].dtype)
         for k in _DOC_KEYS}
  out.update({k: np.zeros((n, length), np.int32) for k in ("segment_ids", "positions")})
  for i, e in enumerate(encoded):
    m = len(e["tokens"])
    sl = slice(length - m, length) if left_pad else slice(0, m)
    for k in _DOC_KEYS:
      out[k][i, sl] = e[k]
    out["segment_ids"][i, sl] = 1
    out["positions"][i, sl] = np.arange(m)
  return out


def mar_schedule(n, steps):
  """Tokens MAR reveals at each step: floor(n cos(pi/2 (k+1) / K)) stay masked after step k of
  K = min(steps, n), and at least one is revealed a step."""
  steps, out, masked = max(1, min(int(steps), n)), [], n
  for k in range(steps):
    left = 0 if k == steps - 1 else min(int(math.floor(n * math.cos(0.5 * math.pi * (k + 1) / steps))),
                                        masked - 1, n - k - 1)
    left = max(left, steps - k - 1)  # one token for each step still to come
    out.append(masked - left)
    masked = left
  return out


def _round_up(n, k=16):
  return -(-n // k) * k


@jax.jit
def _target_logprobs(logits, targets):
  """log p(targets) under logits: [n, L] float32."""
  lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(lp, targets[..., None], axis=-1)[..., 0]


class Prompts:
  """Text-to-image and edit prompts as documents (as training builds them), for a sampler
  whose `_generate(cond, uncond, seed, null=None)` draws the images: the unconditional branch
  without the text, the null branch (edits, two-scale guidance) without the source either."""

  def _blank(self):
    s = self.patcher.image_size
    return np.zeros((s, s, 3), np.uint8)

  def text_to_image(self, prompts, seed=0):
    cond = [D.document("t2i", [D.text(p), D.image(self._blank(), "target")]) for p in prompts]
    uncond = [D.document("t2i", [D.image(self._blank(), "target")]) for _ in prompts]
    return self._generate(cond, uncond, seed)

  def edit(self, images, instructions, seed=0):
    cond = [D.document("edit", [D.image(im, "condition"), D.text(s), D.image(self._blank(), "target")])
            for im, s in zip(images, instructions)]
    uncond = [D.document("edit", [D.image(im, "condition"), D.image(self._blank(), "target")])
              for im in images]
    null = [D.document("edit", [D.image(self._blank(), "target")]) for _ in images]
    return self._generate(cond, uncond, seed, null)


class Sampler(Prompts):
  """Holds a model's graphdef and parameters plus the jitted forward passes."""

  def __init__(self, graphdef, params, cfg, tokenizer, patcher):
    self.graphdef, self.params, self.cfg = graphdef, params, cfg
    self.tok, self.patcher = tokenizer, patcher
    self._forward = jax.jit(self._forward_fn)
    self._decode = jax.jit(self._decode_fn, donate_argnums=1)
    self._encode_images = jax.jit(functools.partial(encode_images, patcher))
    self._mar_z = jax.jit(self._mar_z_fn)
    self._mar_ode = jax.jit(self._mar_ode_fn)

  def _encode(self, docs, add_eos=False):
    """Documents encoded as in training, right-padded into one batch: (encodings, batch)."""
    enc = [encode_document(d, self.tok, self.patcher, add_eos=add_eos) for d in docs]
    return enc, _stack(enc, _round_up(max(len(e["tokens"]) for e in enc)), False)

  def _target_batch(self, docs):
    """(the batch on the device, [n, N] positions of each document's target image)."""
    _, b = self._encode(docs)
    return self._device(b), np.stack([np.nonzero(m == D.NOISED_IMAGE)[0] for m in b["modality"]])

  def _device(self, batch):
    """A stacked batch on the device, its vae / vq images encoded."""
    batch = jax.tree.map(jnp.asarray, batch)
    return self._encode_images(frozen_variables(self.patcher), batch)

  def _model(self, params):
    """The model; routed experts run dropless here (capacity limits are a training-time
    trade of a few dropped tokens for speed, and would make a sample depend on its batch)."""
    model = nnx.merge(self.graphdef, params)
    for block in model.blocks:
      for part in (block, *block.modality_experts):
        if hasattr(part.mlp, "capacity_factor"):
          part.mlp.capacity_factor = 0.0
    return model

  def _forward_fn(self, params, b, t):
    logits, out, _ = self._model(params)(b["tokens"], b["patches"], t, b["modality"], b["image_ids"],
                                         b["patch_index"], b["segment_ids"], b["positions"])
    return logits, out

  def _decode_fn(self, params, cache, b, index):
    model = self._model(params)
    t = jnp.zeros(b["tokens"].shape, jnp.float32)
    logits, _, cache = model(b["tokens"], b["patches"], t, b["modality"], b["image_ids"],
                             b["patch_index"], b["segment_ids"], b["positions"], cache, index)
    return logits[:, -1], cache

  # ---------------------------------------------------------------- images

  def _velocity(self, batch, x, idx, t):
    """Model velocity at the noised positions `idx` ([n, N]) of `batch` for state x [n, N, D]."""
    rows = np.arange(x.shape[0])[:, None]
    patches = batch["patches"].at[rows, idx].set(x)
    tt = jnp.where(batch["modality"] == D.NOISED_IMAGE, t, 0.0)
    b = dict(batch, patches=patches)
    _, out = self._forward(self.params, b, tt)
    out = out[rows, idx]
    return flow.velocity(out, x, jnp.full(x.shape[:2], t), self.cfg.model.prediction, self.cfg.flow.t_min)

  def _generate(self, cond_docs, uncond_docs, seed, null_docs=None):
    """Images by the Euler ODE with classifier-free guidance; with `null_docs` (edits: neither
    the source image nor the text) and sample.image_cfg_scale != 1, InstructPix2Pix's two-scale
    guidance v = v_nn + s_I (v_In - v_nn) + s_T (v_IT - v_In)."""
    if getattr(self.patcher, "discrete", False):
      if self.patcher.causal:
        return self._generate_next_token(cond_docs, uncond_docs, seed)
      return self._generate_masked(cond_docs, uncond_docs, seed)
    if getattr(self.cfg.model, "image_loss", "flow") == "mar":
      return self._generate_mar(cond_docs, uncond_docs, seed)
    s = self.cfg.sample
    image_scale = float(getattr(s, "image_cfg_scale", 1.0))
    sets = [cond_docs] + ([uncond_docs] if s.cfg_scale != 1.0 or image_scale != 1.0 else [])
    if null_docs is not None and image_scale != 1.0:
      sets.append(null_docs)
    # on the device once; every Euler step only swaps in the current x
    batches = [self._target_batch(docs) for docs in sets]
    n, N, Dp = len(cond_docs), self.patcher.num_patches, self.patcher.patch_dim
    x = jax.random.normal(jax.random.key(seed), (n, N, Dp), jnp.float32)
    shift = flow.resolution_shift(self.cfg.flow, self.cfg.data.image_size, self.patcher.num_patches)
    ts = np.asarray(flow.euler_schedule(s.steps, shift))
    for t, t_next in zip(ts[:-1], ts[1:]):
      v = [self._velocity(b, x, idx, float(t)) for b, idx in batches]
      if len(v) == 3:
        v = v[2] + image_scale * (v[1] - v[2]) + s.cfg_scale * (v[0] - v[1])
      elif len(v) == 2:
        v = v[1] + s.cfg_scale * (v[0] - v[1])
      else:
        v = v[0]
      x = x + (t_next - t) * v
    return np.asarray(self.patcher.decode(np.asarray(x)))

  def _mar_z_fn(self, params, b, x, idx, masked):
    """MAR: the transformer's output at the target tokens `idx` [n, N] when they hold x
    [n, N, D] and those `masked` [n, N] show the mask embedding instead: [n, N, W]."""
    rows = jnp.arange(x.shape[0])[:, None]
    patches = b["patches"].at[rows, idx].set(x)
    mask = jnp.zeros(b["tokens"].shape, bool).at[rows, idx].set(masked)
    return losses.mar_hidden(self._model(params), b, patches, mask)[rows, idx]

  def _mar_ode_fn(self, params, z_c, z_u, noise):
    """MAR: every token drawn by the diffusion MLP from its z, Euler from t=1 (`noise`) to 0 on
    the training schedule's shift, guided v = v_u + w (v_c - v_u) when z_u is given."""
    model, s = self._model(params), self.cfg.sample
    shift = flow.resolution_shift(self.cfg.flow, self.cfg.data.image_size, self.patcher.num_patches)
    ts = flow.euler_schedule(s.steps, shift)
    x = noise
    for i in range(s.steps):
      t = jnp.full(x.shape[:2], ts[i])
      v = lambda z: flow.velocity(model.mar_head(x, t, z), x, t, self.cfg.model.prediction,
                                  self.cfg.flow.t_min)
      vel = v(z_c) if z_u is None else v(z_u) + s.cfg_scale * (v(z_c) - v(z_u))
      x = x + (ts[i + 1] - ts[i]) * vel
    return x

  def _generate_mar(self, cond_docs, uncond_docs, seed):
    """Harmon / MAR: all target tokens start masked; each of sample.mask_steps steps runs the
    transformer on what is known, draws every masked token with the diffusion MLP and keeps
    the next ones of a random order (`mar_schedule` of them), the others staying masked."""
    guided = self.cfg.sample.cfg_scale != 1.0
    batches = [self._target_batch(d) for d in ([cond_docs, uncond_docs] if guided else [cond_docs])]
    n, N, dim = len(cond_docs), self.patcher.num_patches, self.patcher.patch_dim
    rng = np.random.default_rng(seed)
    order = np.stack([rng.permutation(N) for _ in range(n)])
    x, known, done = jnp.zeros((n, N, dim), jnp.float32), np.zeros((n, N), bool), 0
    for k, m in enumerate(mar_schedule(N, int(self.cfg.sample.mask_steps))):
      zs = [self._mar_z(self.params, b, x, idx, jnp.asarray(~known)) for b, idx in batches]
      noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), k), x.shape)
      drawn = self._mar_ode(self.params, zs[0], zs[1] if guided else None, noise)
      reveal = np.zeros((n, N), bool)
      reveal[np.arange(n)[:, None], order[:, done:done + m]] = True
      x = jnp.where(jnp.asarray(reveal)[..., None], drawn, x)
      known, done = known | reveal, done + m
    return np.asarray(self.patcher.decode(np.asarray(x)))

  def _guided_codes(self, logits_c, logits_u):
    """Guided logits over the codes only: [n, ..., num_codes] float32."""
    p = self.patcher
    lc = logits_c[..., p.code_offset:p.code_offset + p.num_codes].astype(jnp.float32)
    if logits_u is None:
      return lc
    lu = logits_u[..., p.code_offset:p.code_offset + p.num_codes].astype(jnp.float32)
    return lu + self.cfg.sample.cfg_scale * (lc - lu)

  def _sample_codes(self, logits, rng):
    """Codes drawn at sample.image_temperature among the sample.image_top_k most likely
    (argmax at temperature 0)."""
    s = self.cfg.sample
    if s.image_temperature <= 0:
      return jnp.argmax(logits, axis=-1)
    logits = logits / s.image_temperature
    if s.image_top_k > 0:
      kth = jax.lax.top_k(logits, s.image_top_k)[0][..., -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)

  def _generate_next_token(self, cond_docs, uncond_docs, seed):
    return self.patcher.decode(self.next_token_codes(cond_docs, uncond_docs, seed))

  def next_token_codes(self, cond_docs, uncond_docs, seed):
    """Early fusion: prompt (the document up to its target image) + <boi>, then the
    codes one at a time with the KV cache; cond and uncond rows share one batch. Returns
    the code ids (text vocabulary offset included) [n, N] int32."""
    p, n = self.patcher, len(cond_docs)
    guided = self.cfg.sample.cfg_scale != 1.0
    docs = cond_docs + (uncond_docs if guided else [])
    enc = []
    for d in docs:
      segs = d["segments"]
      first = next(k for k, g in enumerate(segs) if g["kind"] == "image" and g["role"] == "target")
      e = encode_document(dict(d, segments=segs[:first]), self.tok, p, add_eos=False)
      e = {k: np.concatenate([v, np.zeros((1,) + v.shape[1:], v.dtype)]) for k, v in e.items()}
      e["tokens"][-1] = self.tok.boi_id
      enc.append(e)
    lengths = np.array([len(e["tokens"]) for e in enc])
    Lp = _round_up(int(lengths.max()))
    b = self._device(_stack(enc, Lp, left_pad=True))
    rows, N = len(docs), p.num_patches
    dtype = jax.tree.leaves(self.params)[0].dtype
    cache = self._model(self.params).init_cache(rows, Lp + N, dtype)
    logits, cache = self._decode(self.params, cache, b, 0)
    rng = jax.random.key(seed)
    out = np.zeros((n, N), np.int32)
    for i in range(N):
      rng, sub = jax.random.split(rng)
      lg = self._guided_codes(logits[:n], logits[n:] if guided else None)
      ids = np.asarray(self._sample_codes(lg, sub)).astype(np.int32) + p.code_offset
      out[:, i] = ids
      if i == N - 1:
        break
      nxt = np.concatenate([ids, ids]) if guided else ids
      step = {"tokens": nxt[:, None], "patches": np.zeros((rows, 1, p.patch_dim), np.float32),
              "modality": np.zeros((rows, 1), np.int32), "image_ids": np.zeros((rows, 1), np.int32),
              "patch_index": np.full((rows, 1), i, np.int32),  # code i sits at patch i
              "segment_ids": np.ones((rows, 1), np.int32),
              "positions": (lengths + i)[:, None].astype(np.int32)}
      logits, cache = self._decode(self.params, cache, step, Lp + i)
    return out

  def _generate_masked(self, cond_docs, uncond_docs, seed):
    """MaskGIT decoding (confidence = log p of the drawn code plus Gumbel noise annealed
    from MASKGIT_CHOICE_TEMPERATURE to 0, as in MaskGIT)."""
    p, n, T = self.patcher, len(cond_docs), int(self.cfg.sample.mask_steps)
    guided = self.cfg.sample.cfg_scale != 1.0
    bc, ic = self._target_batch(cond_docs)
    bu, iu = self._target_batch(uncond_docs) if guided else (None, None)
    N, r = p.num_patches, np.arange(n)[:, None]
    ids = jnp.full((n, N), p.mask_id, jnp.int32)
    rng = jax.random.key(seed)
    zero = lambda b: jnp.zeros(b["tokens"].shape, jnp.float32)
    for s in range(T):
      logits_c, _ = self._forward(self.params, dict(bc, tokens=bc["tokens"].at[r, ic].set(ids)),
                                  zero(bc))
      logits_u = None
      if guided:
        logits_u, _ = self._forward(self.params, dict(bu, tokens=bu["tokens"].at[r, iu].set(ids)),
                                    zero(bu))
        logits_u = logits_u[r, iu]
      lg = self._guided_codes(logits_c[r, ic], logits_u)
      rng, k_draw, k_gumbel = jax.random.split(rng, 3)
      drawn = self._sample_codes(lg, k_draw)
      logp = jnp.take_along_axis(jax.nn.log_softmax(lg, -1), drawn[..., None], -1)[..., 0]
      masked = ids == p.mask_id
      cand = jnp.where(masked, drawn.astype(jnp.int32) + p.code_offset, ids)
      keep_masked = int(math.floor(N * math.cos(0.5 * math.pi * (s + 1) / T)))
      if keep_masked <= 0:
        ids = cand
        break
      noise = MASKGIT_CHOICE_TEMPERATURE * (1.0 - (s + 1) / T) * jax.random.gumbel(k_gumbel, logp.shape)
      conf = jnp.where(masked, logp + noise, jnp.inf)
      keep_masked = min(keep_masked, int(jnp.min(masked.sum(-1))) - 1)
      rank = jnp.argsort(jnp.argsort(conf, axis=-1), axis=-1)
      ids = jnp.where(rank < keep_masked, p.mask_id, cand)
    return p.decode(np.asarray(ids))

  # ---------------------------------------------------------------- scoring

  def text_logprobs(self, docs):
    """(mean log p per scored token in nats, scored tokens): [n] float64, [n] int. The scored
    tokens are those the LM loss applies to in training (the text segments with loss, and
    <eos> after them), each given everything before it: a document's length-normalised
    log-likelihood, as curation's caption score uses it."""
    enc, b = self._encode(docs, add_eos=True)
    mask = np.zeros(b["tokens"].shape, np.float32)
    for i, e in enumerate(enc):
      mask[i, :len(e["loss_mask"])] = e["loss_mask"]
    batch = self._device(b)
    logits, _ = self._forward(self.params, batch, jnp.zeros(b["tokens"].shape, jnp.float32))
    lp = np.asarray(_target_logprobs(logits, batch["targets"]), np.float64)
    count = mask.sum(-1)
    return (lp * mask).sum(-1) / np.maximum(count, 1), count.astype(int)

  def flow_losses(self, docs, times=(0.25, 0.5, 0.75), seed=0):
    """[n]: the flow-matching loss of each document's target image (one per document), the
    mean squared error of the predicted velocity against eps - x0 over the patches, averaged
    over `times` with fixed noise (drawn from seed): how well the rest of the document
    explains the image."""
    if getattr(self.patcher, "discrete", False):
      raise UserError("flow losses need a model that generates images by flow matching "
                      "(model.image_tokenizer pixels or vae), not discrete codes")
    batch, idx = self._target_batch(docs)
    rows = np.arange(len(docs))[:, None]
    x0 = batch["patches"][rows, idx].astype(jnp.float32)
    total = np.zeros(len(docs))
    for k, t in enumerate(times):
      eps = jax.random.normal(jax.random.fold_in(jax.random.key(seed), k), x0.shape, jnp.float32)
      v = self._velocity(batch, (1.0 - t) * x0 + t * eps, idx, float(t))
      total += np.asarray(jnp.mean((v - (eps - x0)) ** 2, axis=(1, 2)))
    return total / len(times)

  # ---------------------------------------------------------------- text

  def image_to_text(self, images, prompts=None, seed=0):
    """Continues `[image, prompt]` with text until <eos>; greedy when sample.temperature == 0."""
    s = self.cfg.sample
    prompts = prompts or [""] * len(images)
    docs = [D.document("caption", [D.image(im, "condition")] + ([D.text(p, loss=False)] if p else []))
            for im, p in zip(images, prompts)]
    if getattr(self.cfg.model, "text_loss", "next_token") != "next_token":
      return self._text_by_diffusion(docs)
    enc = [encode_document(d, self.tok, self.patcher, add_eos=False) for d in docs]
    lengths = np.array([len(e["tokens"]) for e in enc])
    Lp = _round_up(int(lengths.max()))
    b = self._device(_stack(enc, Lp, left_pad=True))
    n = len(images)
    dtype = jax.tree.leaves(self.params)[0].dtype
    cache = self._model(self.params).init_cache(n, Lp + s.max_new_tokens, dtype)
    logits, cache = self._decode(self.params, cache, b, 0)
    rng = jax.random.key(seed)
    out = np.zeros((n, s.max_new_tokens), np.int64)
    done = np.zeros(n, bool)
    for i in range(s.max_new_tokens):
      rng, sub = jax.random.split(rng)
      nxt = np.asarray(self._pick(logits, sub))
      nxt = np.where(done, self.tok.pad_id, nxt)
      out[:, i] = nxt
      done |= nxt == self.tok.eos_id
      if done.all():
        break
      step = {"tokens": nxt[:, None].astype(np.int32),
              "patches": np.zeros((n, 1, self.patcher.patch_dim), np.float32),
              "modality": np.zeros((n, 1), np.int32), "image_ids": np.zeros((n, 1), np.int32),
              "patch_index": np.zeros((n, 1), np.int32), "segment_ids": np.ones((n, 1), np.int32),
              "positions": (lengths + i)[:, None].astype(np.int32)}
      logits, cache = self._decode(self.params, cache, step, Lp + i)
    return [self.tok.decode([int(x) for x in row]) for row in out]

  def _answer_block(self, docs, fill):
    """Text diffusion's layout: each prompt followed by an answer block of data.answer_len
    tokens (the length training padded answers to with <eos>) holding `fill` [n, n_ans]:
    (the batch on the device, [n, n_ans] positions of the blocks)."""
    n_ans = fill.shape[1]
    enc = []
    for d, f in zip(docs, np.asarray(fill)):
      e = encode_document(d, self.tok, self.patcher, add_eos=False)
      e = {k: np.concatenate([v, np.zeros((n_ans,) + v.shape[1:], v.dtype)]) for k, v in e.items()}
      e["tokens"][-n_ans:] = f
      enc.append(e)
    lengths = np.array([len(e["tokens"]) for e in enc])
    b = self._device(_stack(enc, _round_up(int(lengths.max())), left_pad=False))
    return b, jnp.asarray(lengths[:, None] - n_ans + np.arange(n_ans))

  def _answer_logits(self, b, idx, ids):
    """The model's text logits [n, n_ans, text vocabulary] at the answer block holding ids."""
    rows = np.arange(ids.shape[0])[:, None]
    logits, _ = self._forward(self.params, dict(b, tokens=b["tokens"].at[rows, idx].set(ids)),
                              jnp.zeros(b["tokens"].shape, jnp.float32))
    return logits[rows, idx][..., :self.tok.vocab_size]

  def _text_by_diffusion(self, docs):
    """Text diffusion (model.text_loss "masked" or "flow"): an answer block of data.answer_len
    tokens after each prompt, refined over sample.text_steps steps (0: one a token); the text
    ends at the first <eos>."""
    s = self.cfg.sample
    n_ans = int(getattr(self.cfg.data, "answer_len", 0)) or int(s.max_new_tokens)
    steps = min(int(getattr(s, "text_steps", 0)) or n_ans, n_ans)
    fill = self._flow_text if self.cfg.model.text_loss == "flow" else self._unmask_text
    ids = fill(docs, n_ans, steps, jax.random.key(0))
    return [self.tok.decode([int(x) for x in row]) for row in np.asarray(ids)]

  def _draw_answer(self, b, idx, ids, rng):
    """(text logits at the block, tokens drawn from them: greedy or at sample.temperature)."""
    lg = self._answer_logits(b, idx, ids)
    n, n_ans = ids.shape
    return lg, self._pick(lg.reshape(n * n_ans, -1), rng).reshape(n, n_ans).astype(jnp.int32)

  def _unmask_text(self, docs, n_ans, steps, rng):
    """MMaDA / LLaDA: the block starts as mask ids; each step predicts every masked position
    and unmasks the most confident, the rest staying masked (low-confidence remasking), an
    equal share a step; with sample.text_block, sub-blocks of that many tokens left to right
    (semi-autoregressive, as LLaDA / MMaDA sample: otherwise the confident <eos> padding is
    unmasked first)."""
    mask_id = self.patcher.mask_id
    ids = jnp.full((len(docs), n_ans), mask_id, jnp.int32)
    b, idx = self._answer_block(docs, ids)
    block = min(int(getattr(self.cfg.sample, "text_block", 0)) or n_ans, n_ans)
    blocks = -(-n_ans // block)
    per_block = max(1, steps // blocks)
    for k in range(blocks * per_block):
      rng, sub = jax.random.split(rng)
      lg, drawn = self._draw_answer(b, idx, ids, sub)
      conf = jnp.take_along_axis(jax.nn.log_softmax(lg, -1), drawn[..., None], -1)[..., 0]
      j, r = divmod(k, per_block)  # block j, its step r
      size = min(block, n_ans - j * block)
      here = (np.arange(n_ans) >= j * block) & (np.arange(n_ans) < j * block + size)
      masked = (ids == mask_id) & jnp.asarray(here)
      still = size * (per_block - r - 1) // per_block  # masked in the block after this step
      conf = jnp.where(masked, conf, -jnp.inf)
      rank = jnp.argsort(jnp.argsort(-conf, axis=-1), axis=-1)  # 0: the most confident
      ids = jnp.where(masked & (rank < masked.sum(-1, keepdims=True) - still), drawn, ids)
    return ids

  def _flow_text(self, docs, n_ans, steps, rng):
    """FUDOKI: the block starts uniform over the text rows of the token table (the path at
    t = 1); each step from t to t - 1/K predicts the clean tokens x1 and draws the block anew
    from the metric path p_{t - 1/K}(. | x1) (`losses.metric_path_logits`), x1 at the end.
    With sample.text_block, sub-blocks of that many tokens left to right: for each, the
    positions from it on restart uniform and run the path, and the sub-block keeps its x1."""
    m, vocab = self.cfg.model, self.patcher.code_offset
    block = min(int(getattr(self.cfg.sample, "text_block", 0)) or n_ans, n_ans)
    blocks = -(-n_ans // block)
    per_block = max(1, steps // blocks)
    ids = jnp.zeros((len(docs), n_ans), jnp.int32)
    b, idx = self._answer_block(docs, ids)
    emb = self._model(self.params).embed.value[:vocab]
    beta = (losses.path_beta_scale(m.text_flow, vocab), float(m.text_flow.beta_power))
    for j in range(blocks):
      rest = jnp.asarray(np.arange(n_ans) >= j * block)  # this sub-block and those after it
      rng, sub = jax.random.split(rng)
      ids = jnp.where(rest, jax.random.randint(sub, ids.shape, 0, vocab, jnp.int32), ids)
      for k in range(per_block):
        rng, sub, sub2 = jax.random.split(rng, 3)
        _, x1 = self._draw_answer(b, idx, ids, sub)
        t_next = 1.0 - (k + 1) / per_block
        if t_next > 0:
          path = losses.metric_path_logits(emb, x1, jnp.full(ids.shape, t_next), *beta)
          x1 = jax.random.categorical(sub2, path).astype(jnp.int32)
        ids = jnp.where(rest, x1, ids)
    return ids

  def _pick(self, logits, rng):
    s = self.cfg.sample
    logits = logits[:, :self.tok.vocab_size]
    if s.temperature <= 0:
      return jnp.argmax(logits, axis=-1)
    logits = logits / s.temperature
    probs = jax.nn.softmax(logits, axis=-1)
    sorted_p = jnp.sort(probs, axis=-1)[:, ::-1]
    cum = jnp.cumsum(sorted_p, axis=-1)
    last = jnp.minimum(jnp.sum(cum < s.top_p, axis=-1, keepdims=True), probs.shape[-1] - 1)
    cutoff = jnp.take_along_axis(sorted_p, last, axis=-1)  # smallest kept probability
    logits = jnp.where(probs < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1)
