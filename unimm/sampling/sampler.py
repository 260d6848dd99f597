"""Sampling from the unified model: text to image, image to text, edits.

- images: Euler ODE from t=1 (noise) to t=0 with classifier-free guidance,
  v = v_uncond + w (v_cond - v_uncond); the unconditional branch drops the
  text that precedes the target image, as condition dropout did in training.
- text: greedy or top-p decoding with a KV cache; prompts are left-padded so
  that every row of a batch decodes into the same cache slot.

Prompts are documents (`unimm.data.document`) encoded exactly as in training.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.data import document as D
from unimm.data.pipeline import encode_document
from unimm.objectives import flow

SEQ_KEYS = ("tokens", "patches", "modality", "image_ids", "patch_index", "segment_ids", "positions")


def _stack(encoded, length, left_pad):
  """Pads encoded documents to `length` and stacks them; segment 0 marks padding."""
  n = len(encoded)
  D_ = encoded[0]["patches"].shape[-1]
  out = {k: np.zeros((n, length), np.int32) for k in SEQ_KEYS if k != "patches"}
  out["patches"] = np.zeros((n, length, D_), np.float32)
  for i, e in enumerate(encoded):
    m = len(e["tokens"])
    sl = slice(length - m, length) if left_pad else slice(0, m)
    for k in ("tokens", "patches", "modality", "image_ids", "patch_index"):
      out[k][i, sl] = e[k]
    out["segment_ids"][i, sl] = 1
    out["positions"][i, sl] = np.arange(m)
  return out


def _round_up(n, k=16):
  return -(-n // k) * k


class Sampler:
  """Holds a model's graphdef and parameters plus the jitted forward passes."""

  def __init__(self, graphdef, params, cfg, tokenizer, patcher):
    self.graphdef, self.params, self.cfg = graphdef, params, cfg
    self.tok, self.patcher = tokenizer, patcher
    self._forward = jax.jit(self._forward_fn)
    self._decode = jax.jit(self._decode_fn, donate_argnums=1)

  def _model(self, params):
    return nnx.merge(self.graphdef, params)

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

  def _generate(self, cond_docs, uncond_docs, seed):
    enc_c = [encode_document(d, self.tok, self.patcher, add_eos=False) for d in cond_docs]
    enc_u = [encode_document(d, self.tok, self.patcher, add_eos=False) for d in uncond_docs]
    Lc = _round_up(max(len(e["tokens"]) for e in enc_c))
    Lu = _round_up(max(len(e["tokens"]) for e in enc_u))
    bc, bu = _stack(enc_c, Lc, False), _stack(enc_u, Lu, False)
    noised_idx = lambda b: np.stack([np.nonzero(m == D.NOISED_IMAGE)[0] for m in b["modality"]])
    ic, iu = noised_idx(bc), noised_idx(bu)
    # on the device once; every Euler step only swaps in the current x
    bc, bu = jax.tree.map(jnp.asarray, bc), jax.tree.map(jnp.asarray, bu)
    n, N, Dp = len(cond_docs), self.patcher.num_patches, self.patcher.patch_dim
    x = jax.random.normal(jax.random.key(seed), (n, N, Dp), jnp.float32)
    s = self.cfg.sample
    ts = np.asarray(flow.euler_schedule(s.steps, flow.resolution_shift(self.cfg.flow, self.cfg.data.image_size)))
    for t, t_next in zip(ts[:-1], ts[1:]):
      v = self._velocity(bc, x, ic, float(t))
      if s.cfg_scale != 1.0:
        v_u = self._velocity(bu, x, iu, float(t))
        v = v_u + s.cfg_scale * (v - v_u)
      x = x + (t_next - t) * v
    return np.asarray(self.patcher.decode(np.asarray(x)))

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
    return self._generate(cond, uncond, seed)

  # ---------------------------------------------------------------- text

  def image_to_text(self, images, prompts=None, seed=0):
    """Continues `[image, prompt]` with text until <eos>; greedy when sample.temperature == 0."""
    s = self.cfg.sample
    prompts = prompts or [""] * len(images)
    docs = [D.document("caption", [D.image(im, "condition")] + ([D.text(p, loss=False)] if p else []))
            for im, p in zip(images, prompts)]
    enc = [encode_document(d, self.tok, self.patcher, add_eos=False) for d in docs]
    lengths = np.array([len(e["tokens"]) for e in enc])
    Lp = _round_up(int(lengths.max()))
    b = _stack(enc, Lp, left_pad=True)
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
