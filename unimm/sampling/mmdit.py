"""Sampling from the MMDiT (model.family="mmdit"): text to image and edits.

The ODE runs t from 1 (noise) to 0 with sample.solver "euler" or "heun" (Heun's second-order
step: two model evaluations a step, Euler on the last), on the schedule shifted like training
(flow.shift_kind). Guidance:
  true CFG        v = v_u + s_T (v_c - v_u), the unconditional branch without the text
                  (as data.cfg_dropout trained it); sample.cfg_scale = 1 turns it off
  two-scale CFG   edits: v = v_nn + s_I (v_In - v_nn) + s_T (v_IT - v_In), the null branch
                  without the source image either (data.image_dropout; sample.image_cfg_scale)
  guidance embed  distilled models (model.mmdit.guidance_embed): sample.guidance is embedded,
                  one evaluation a step unless cfg_scale != 1 asks for true CFG as well
Prompts are documents encoded as in training (`encode_document`), one per row.
A conditioner with a frozen LLM (llm, metaquery) also captions and answers with that LLM, so
ShapesEval shows its understanding scores next to the MMDiT's generation scores. A query
tokenizer (encoder "seed") or X-Omni's decoder over VQ codes (encoder "vq") encodes images into
codes and renders codes (`reconstruct`).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.data.pipeline import encode_document
from unimm.errors import UserError
from unimm.models.image_tokenizer import encode_images, frozen_variables
from unimm.objectives import flow
from unimm.sampling.sampler import Prompts, _round_up, _stack

SOLVERS = ("euler", "heun")


class DiffusionSampler(Prompts):
  """The MMDiT's parameters plus its jitted prediction; `text_to_image`, `edit` (and, with a
  frozen LLM in the conditioner, `image_to_text` by that LLM)."""

  def __init__(self, graphdef, params, cfg, tokenizer, patcher):
    self.graphdef, self.params, self.cfg = graphdef, params, cfg
    self.tok, self.patcher = tokenizer, patcher
    if cfg.sample.solver not in SOLVERS:
      raise UserError(f"sample.solver='{cfg.sample.solver}' is unknown: use one of {', '.join(SOLVERS)}")
    self._predict = jax.jit(self._predict_fn)
    self._encode_images = jax.jit(lambda v, b: encode_images(patcher, v, b))
    model = nnx.merge(graphdef, params)
    self.guidance_embed = bool(model.guidance)
    self.llm = None
    # a code-conditioned decoder (seed, vq): eval scores its round trip through the codes
    self.reconstructs = model.encoder_kind in ("seed", "vq")
    if hasattr(model, "llm"):
      self.llm = self._llm_sampler(model)

  def _llm_sampler(self, model):
    from unimm.models.conditioning import llm_config  # pylint: disable=import-outside-toplevel
    from unimm.sampling.sampler import Sampler  # pylint: disable=import-outside-toplevel
    llm_cfg = llm_config(self.cfg.model.condition.llm, self.cfg)
    llm_cfg.sample.update(max_new_tokens=self.cfg.sample.max_new_tokens,
                          temperature=self.cfg.sample.temperature, top_p=self.cfg.sample.top_p)
    graphdef, params = nnx.split(model.llm, nnx.Param)
    return Sampler(graphdef, params, llm_cfg, self.tok, self.patcher)

  def _predict_fn(self, params, batch, x, t, guidance):
    model = nnx.merge(self.graphdef, params)
    pred = model(batch, x, t, guidance)
    return flow.velocity(pred, x, jnp.broadcast_to(t[:, None], x.shape[:2]),
                         self.cfg.model.prediction, self.cfg.flow.t_min)

  def _batches(self, sets):
    """Each list of documents as one device batch, all padded to one length (one compile)."""
    enc = [[encode_document(d, self.tok, self.patcher) for d in docs] for docs in sets]
    length = _round_up(max(len(e["tokens"]) for docs in enc for e in docs))
    return [self._encode_images(frozen_variables(self.patcher),
                                jax.tree.map(jnp.asarray, _stack(docs, length, False)))
            for docs in enc]

  def _generate(self, cond_docs, uncond_docs, seed, null_docs=None):
    s = self.cfg.sample
    image_scale = float(s.image_cfg_scale)
    sets = [cond_docs]
    if s.cfg_scale != 1.0 or (null_docs is not None and image_scale != 1.0):
      sets.append(uncond_docs)
    if null_docs is not None and image_scale != 1.0:
      sets.append(null_docs)
    batches = self._batches(sets)
    n, N, Dp = len(cond_docs), self.patcher.num_patches, self.patcher.patch_dim
    guidance = jnp.full((n,), float(s.guidance), jnp.float32) if self.guidance_embed else None

    def velocity(x, t):
      tt = jnp.full((n,), t, jnp.float32)
      v = [self._predict(self.params, b, x, tt, guidance) for b in batches]
      if len(v) == 3:
        return v[2] + image_scale * (v[1] - v[2]) + s.cfg_scale * (v[0] - v[1])
      if len(v) == 2:
        return v[1] + s.cfg_scale * (v[0] - v[1])
      return v[0]

    return self._solve(velocity, n, seed)

  def _solve(self, velocity, n, seed):
    """The ODE from noise (of `seed`) to n images, velocity(x, t) as the guidance makes it."""
    s, N, Dp = self.cfg.sample, self.patcher.num_patches, self.patcher.patch_dim
    x = jax.random.normal(jax.random.key(seed), (n, N, Dp), jnp.float32)
    shift = flow.resolution_shift(self.cfg.flow, self.cfg.data.image_size, N)
    ts = np.asarray(flow.euler_schedule(s.steps, shift))
    for t, t_next in zip(ts[:-1], ts[1:]):
      t, t_next = float(t), float(t_next)
      v = velocity(x, t)
      x_next = x + (t_next - t) * v
      if s.solver == "heun" and t_next > 0:
        x_next = x + (t_next - t) * 0.5 * (v + velocity(x_next, t_next))
      x = x_next
    return np.asarray(self.patcher.decode(np.asarray(x)))

  # ------------------- code-conditioned decoders: SEED-LLaMA's (encoder "seed"), X-Omni's ("vq")

  def _from_codes_fn(self, params, codes, x, t):
    model = nnx.merge(self.graphdef, params)
    tt = jnp.full(codes.shape[:1], t, jnp.float32)
    return flow.velocity(model.from_codes(codes, x, tt), x, jnp.broadcast_to(tt[:, None], x.shape[:2]),
                         self.cfg.model.prediction, self.cfg.flow.t_min)

  def _codes_fn(self, params, variables, images):
    model = nnx.merge(self.graphdef, params)
    if model.encoder_kind == "vq":
      return self.patcher.codes(variables, images)
    return model.seed.codes(self.patcher.encode(images, xp=jnp))

  def image_codes(self, images):
    """uint8 [n, H, W, 3] -> the code ids [n, Q] int32 of the query tokenizer (seed) or of
    the frozen VQ tokenizer (vq)."""
    if not hasattr(self, "_codes"):
      self._codes = jax.jit(self._codes_fn)
    return np.asarray(self._codes(self.params, frozen_variables(self.patcher), jnp.asarray(images)))

  def render_codes(self, codes, seed=0):
    """Code ids [n, Q] -> uint8 images [n, H, W, 3]: the decoder's ODE conditioned on them."""
    if not hasattr(self, "_render"):
      self._render = jax.jit(self._from_codes_fn)
    codes = jnp.asarray(codes, jnp.int32)
    return self._solve(lambda x, t: self._render(self.params, codes, x, t), len(codes), seed)

  def reconstruct(self, images, seed=0):
    """The query tokenizer's round trip: images -> codes -> rendered images."""
    return self.render_codes(self.image_codes(images), seed)

  def image_to_text(self, images, prompts=None, seed=0):
    if self.llm is None:
      raise UserError("this MMDiT has no language model to caption with (model.condition.encoder="
                      f"'{self.cfg.model.condition.encoder}')")
    return self.llm.image_to_text(images, prompts, seed)
