"""The model the train step runs for model.family="mmdit": a conditioner and the MMDiT
(`unimm.models.mmdit`), on the batch contract (`unimm.batch`) with one document per row
(data.docs_per_row=1: each row is one training example, as diffusers trains).

From each row the model takes two streams, by position:

  image stream  the first target image's N tokens (x_t; the loss is on them alone), then with
                model.mmdit.edit="kontext" up to model.mmdit.references condition images of
                the same size (clean, RoPE frame 1, 2, ...: FLUX.1 Kontext, OmniGen-style
                subject references); with "concat" the source patches aligned with the target
                (`aligned_source`) are concatenated to its channels (InstructPix2Pix)
  text stream   what model.condition.encoder makes of the document:
     "text"       a small trainable bidirectional text encoder over its text positions
     "llm"        the final hidden states of a frozen LLM at its text positions; the LLM reads
                  the whole document, an edit's source image included (Qwen-Image)
     "metaquery"  N learnable queries in place of the target image's tokens in the frozen
                  LLM's input; their last hidden states through a trainable connector (MetaQuery);
                  in the MMDiT each keeps the RoPE position of the image token it replaced
     "seed"       the target image itself through a query tokenizer (`QueryTokenizer`: ViT,
                  causal Q-Former, FSQ codes): the MMDiT is then SEED-LLaMA's decoder, trained
                  with the tokenizer as an autoencoder, and renders codes an LLM generates
                  (`from_codes`; `unimm.models.image_tokenizer.QueryCodes`)
     "vq"         the target image's codes by a frozen VQ tokenizer (model.condition.tokenizer;
                  the batch's `codes`, `image_tokenizer.CodedPixels`) through a trainable code
                  encoder: X-Omni's diffusion decoder, which renders the codes a unified model
                  generates (`from_codes`; model.image_decoder)

The frozen LLM (model.condition.llm: a unimm training workdir of the unified model) is part of
the parameters, loaded from its checkpoint at the start of training; its parameters get no
gradient (stop_gradient) and no update (`frozen_params`), so it keeps its understanding.
Classifier-free guidance is trained by the data pipeline's condition dropout (data.cfg_dropout,
data.image_dropout).
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.batch import CLEAN_IMAGE, NOISED_IMAGE, TEXT
from unimm.errors import UserError
from unimm.kernels.mask import MAX_IMAGE, run_bounds
from unimm.models.layers import Block, MaskIds, RMSNorm, aligned_source, param, run_blocks
from unimm.parallel.sharding import constrain

ENCODERS = ("text", "llm", "metaquery", "seed", "vq")
EDITS = ("kontext", "concat", "none")


def first_positions(mask, n):
  """The first n positions where mask [B, L] holds, in order: (index [B, n] int32, valid
  [B, n] bool); rows with fewer fill the rest with invalid indices."""
  length = mask.shape[1]
  idx = jnp.arange(length, dtype=jnp.int32)
  order = jnp.argsort(jnp.where(mask, idx, length + idx), axis=1)[:, :n].astype(jnp.int32)
  return order, jnp.take_along_axis(mask, order, axis=1)


def gather(x, idx):
  """x [B, L, ...] at idx [B, n] -> [B, n, ...]."""
  return jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)


def bidirectional_ids(mask):
  """Mask ids under which every valid token (mask [B, L]) sees every other and no padding."""
  valid = mask.astype(jnp.int32)
  return MaskIds(valid, valid * CLEAN_IMAGE, valid, jnp.zeros_like(valid))


def _block_cfg(model_cfg, width, depth):
  """A dense, single-expert block config of `width` (the text encoder's and connector's)."""
  c = model_cfg.copy_and_resolve_references()
  c.update(width=width, depth=depth, mlp_dim=4 * width, kv_heads=0)
  c.moe.experts, c.mot.route = 0, (0,)
  return c


class Encoder(nnx.Module):
  """Bidirectional blocks over one stream of features (the text encoder, the connector)."""

  def __init__(self, model_cfg, width, depth, *, rngs):
    cfg = _block_cfg(model_cfg, width, depth)
    self.blocks = nnx.List([Block(cfg, rngs=rngs, modality_experts=False) for _ in range(depth)])
    self.norm = RMSNorm(width, rngs=rngs, eps=model_cfg.norm_eps)
    self.scan, self.remat = bool(model_cfg.scan), model_cfg.remat

  def __call__(self, x, mask):
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), mask.shape)
    x, _, _ = run_blocks(self.blocks, x, bidirectional_ids(mask), positions, scan=self.scan,
                         remat=self.remat)
    return self.norm(x)


class TextEncoder(nnx.Module):
  """A small trainable text encoder: a token table and bidirectional blocks (also X-Omni's
  decoder's code encoder, over the table of the VQ codes in raster order)."""

  def __init__(self, model_cfg, vocab_size, *, rngs):
    w = model_cfg.width
    self.embed = param(rngs, (vocab_size, w), ("vocab", "embed"), 1.0)
    self.encoder = Encoder(model_cfg, w, model_cfg.condition.depth, rngs=rngs)

  def __call__(self, tokens, mask):
    x = constrain(jnp.take(self.embed.value, tokens, axis=0), ("batch", "length", "act_embed"))
    return self.encoder(x, mask)


class QueryTokenizer(nnx.Module):
  """SEED-LLaMA's image tokenizer, small: a ViT (bidirectional blocks over the image's patches
  and their position table), a causal Q-Former (model.condition.queries learnable queries after
  the ViT's features; each query reads every patch and the queries before it, so the codes come
  in a left-to-right order an LLM can generate, as SEED's) and a codebook (FSQ of
  model.condition.levels). `__call__` gives the quantized queries (straight-through: the
  decoder's loss trains the tokenizer), `codes` their ids, `embed` ids -> the same features."""

  def __init__(self, model_cfg, patch_dim, num_patches, *, rngs):
    from unimm.models.quantizers import FSQ  # pylint: disable=import-outside-toplevel
    c, w = model_cfg.condition, model_cfg.width
    self.patch_in = param(rngs, (patch_dim, w), (None, "embed"), 1.0 / math.sqrt(patch_dim))
    self.pos = param(rngs, (num_patches, w), ("positions", "embed"), 0.02)
    self.queries = param(rngs, (int(c.queries), w), ("positions", "embed"), 1.0)  # distinct from the start
    self.vit = Encoder(model_cfg, w, int(c.vit_depth), rngs=rngs)
    cfg = _block_cfg(model_cfg, w, int(c.depth))
    self.qformer = nnx.List([Block(cfg, rngs=rngs, modality_experts=False) for _ in range(int(c.depth))])
    self.norm = RMSNorm(w, rngs=rngs, eps=model_cfg.norm_eps)
    self.fsq = FSQ(tuple(c.levels))
    self.to_code = param(rngs, (w, self.fsq.dim), ("embed", None), 1.0 / math.sqrt(w))
    self.from_code = param(rngs, (self.fsq.dim, w), (None, "embed"), 1.0)
    # a small pixel decoder (an MLP over all the image's codes) for the auxiliary reconstruction
    # loss (model.condition.recon_weight) that makes the codes carry the image from the first
    # steps: without it the MMDiT learned to ignore codes that were alike for every image
    codes_in, hidden = int(c.queries) * self.fsq.dim, 4 * w
    self.recon_in = param(rngs, (codes_in, hidden), (None, "mlp"), 1.0 / math.sqrt(codes_in))
    self.recon_out = param(rngs, (hidden, num_patches * patch_dim), ("mlp", None), 1.0 / math.sqrt(hidden))
    self.scan, self.remat = bool(model_cfg.scan), model_cfg.remat

  def queries_out(self, patches):
    """patches [B, N, D] (pixel patches in [-1, 1]) -> the Q-Former's outputs before the
    codebook [B, Q, len(levels)] float32, each of root mean square 1."""
    b, n = patches.shape[:2]
    q = self.queries.value.shape[0]
    x = patches.astype(self.patch_in.value.dtype) @ self.patch_in.value + self.pos.value[None]
    x = self.vit(constrain(x, ("batch", "length", "act_embed")), jnp.ones((b, n), bool))
    x = jnp.concatenate([x, jnp.broadcast_to(self.queries.value[None].astype(x.dtype), (b, q, x.shape[-1]))], 1)
    # the causal Q-Former's mask: patches one bidirectional image at position 0 (they never see
    # the queries), query k at position k + 1 (it sees every patch and queries 1..k)
    pos = jnp.broadcast_to(jnp.concatenate([jnp.zeros(n, jnp.int32), jnp.arange(1, q + 1, dtype=jnp.int32)]), (b, n + q))
    image = (pos == 0).astype(jnp.int32)
    ids = MaskIds(jnp.ones_like(pos), image * CLEAN_IMAGE + (1 - image) * TEXT, image, pos)
    x, _, _ = run_blocks(self.qformer, x, ids, pos, scan=self.scan, remat=self.remat)
    z = self.norm(x[:, n:]).astype(jnp.float32) @ self.to_code.value.astype(jnp.float32)
    # each query's vector on the sphere of radius sqrt(len(levels)): FSQ's tanh never saturates
    # (unbounded, Adam pushed every code into one corner of the codebook, for every image)
    return z * jax.lax.rsqrt(jnp.mean(jnp.square(z), -1, keepdims=True) + 1e-6)

  def embed(self, codes):
    """Code ids [B, Q] -> the decoder's conditioning features [B, Q, width]."""
    return self.fsq.indices_to_codes(codes) @ self.from_code.value

  def codes(self, patches):
    return self.fsq.codes_to_indices(self.fsq.quantize(self.queries_out(patches)))

  def __call__(self, patches):
    z = self.fsq.quantize(self.queries_out(patches))
    self.sow(nnx.Intermediate, "quantized", z)  # for recon_loss, without a second encoder pass
    return z.astype(self.from_code.value.dtype) @ self.from_code.value

  def sown_codes(self):
    """The quantized codes the last `__call__` computed (removed from the module)."""
    return jax.tree.leaves(nnx.pop(self, nnx.Intermediate))[-1]

  def recon_loss(self, patches, ok, z=None):
    """Mean squared error of the pixel decoder's reconstruction from the quantized codes z
    (computed from patches if not given), over the rows with an image (ok [B])."""
    if z is None:
      z = self.fsq.quantize(self.queries_out(patches))
    rec = jax.nn.gelu(z.reshape(z.shape[0], -1) @ self.recon_in.value) @ self.recon_out.value
    rec = rec.reshape(patches.shape)
    err = jnp.mean(jnp.square(rec - patches.astype(jnp.float32)), axis=(1, 2))
    return jnp.sum(jnp.where(ok, err, 0.0)) / jnp.maximum(jnp.sum(ok), 1)


def llm_config(path, run_cfg=None):
  """The full config of the frozen LLM at `path`: a unimm training workdir of the unified model
  (its config.json), or a local Hugging Face decoder directory (Llama, Qwen2/2.5, Qwen3: its
  architecture through `unimm.interop.hf_llm`, its tokenizer, and the image fields of
  `run_cfg`, since such an LLM reads no images of its own)."""
  from unimm.config import defaults, from_saved  # pylint: disable=import-outside-toplevel
  if not path:
    raise UserError("model.condition.encoder needs model.condition.llm: the workdir of a trained "
                    "unified model or a local Hugging Face decoder directory")
  file = os.path.join(path, "config.json")
  if not os.path.exists(file):
    raise UserError(f"model.condition.llm={path}: no config.json there; give the workdir of a "
                    "trained unified model or a Hugging Face decoder directory")
  with open(file) as f:
    saved = json.load(f)
  if "model_type" in saved:  # a Hugging Face checkpoint
    from unimm.interop.hf_llm import apply_model_fields  # pylint: disable=import-outside-toplevel
    cfg = defaults()
    apply_model_fields(cfg, path)
    cfg.data.tokenizer = path
    if run_cfg is not None:
      cfg.data.image_size = run_cfg.data.image_size
      for k in ("patch_size", "image_tokenizer", "tokenizer_path", "latent_patch"):
        cfg.model[k] = run_cfg.model[k]
    return cfg
  cfg = from_saved(saved)
  if cfg.model.family != "unified":
    raise UserError(f"model.condition.llm={path} holds a {cfg.model.family} model, not a unified one")
  return cfg


class DiffusionModel(nnx.Module):
  """Conditioner + MMDiT over one document per row (see the module docstring)."""

  def __init__(self, cfg, *, vocab_size, patcher, rngs):
    from unimm.models.mmdit import MMDiT  # pylint: disable=import-outside-toplevel
    m = cfg.model
    self.encoder_kind, self.edit = m.condition.encoder, m.mmdit.edit
    if self.encoder_kind not in ENCODERS:
      raise UserError(f"model.condition.encoder='{self.encoder_kind}' is unknown: use one of "
                      f"{', '.join(ENCODERS)}")
    if self.edit not in EDITS:
      raise UserError(f"model.mmdit.edit='{self.edit}' is unknown: use one of {', '.join(EDITS)}")
    if patcher.max_rows != patcher.grid or patcher.max_cols != patcher.grid:
      raise UserError("the MMDiT trains on square images: set data.max_aspect=1")
    self.grid, self.max_cols = int(patcher.grid), int(patcher.max_cols)
    self.tokens = int(patcher.num_patches)  # N: the target image's tokens
    self.references = int(m.mmdit.references) if self.edit == "kontext" else 0
    self.prediction, self.t_min = m.prediction, float(cfg.flow.t_min)
    self.text_len = int(m.condition.get("text_len", 0))
    w = m.width
    mcfg = m.copy_and_resolve_references()
    context = w
    if self.encoder_kind == "text":
      self.text_encoder = TextEncoder(m, vocab_size, rngs=rngs)
    elif self.encoder_kind == "seed":
      self.seed = QueryTokenizer(m, patcher.patch_dim, self.tokens, rngs=rngs)
    elif self.encoder_kind == "vq":
      self.code_encoder = TextEncoder(m, patcher.num_codes, rngs=rngs)
    else:
      llm_cfg = llm_config(m.condition.llm, cfg)
      if llm_cfg.data.tokenizer != cfg.data.tokenizer:
        raise UserError(f"data.tokenizer='{cfg.data.tokenizer}' differs from the LLM's "
                        f"'{llm_cfg.data.tokenizer}' ({m.condition.llm}): use the LLM's tokenizer")
      from unimm.models.unified import build_model  # pylint: disable=import-outside-toplevel
      self.llm = build_model(llm_cfg, vocab_size=vocab_size)[0]
      if self.llm.patch_dim != patcher.patch_dim:
        raise UserError(f"the LLM in {m.condition.llm} reads images of {self.llm.patch_dim}-wide "
                        f"patches, this config {patcher.patch_dim}: use its image tokenizer, "
                        "data.image_size and model.patch_size")
      llm_w = self.llm.width
      context = llm_w
      if self.encoder_kind == "metaquery":
        self.queries = param(rngs, (patcher.num_positions, llm_w), ("positions", "embed"), 1.0)
        self.connector_in = param(rngs, (llm_w, w), ("embed", None), 1.0 / math.sqrt(llm_w))
        self.connector = Encoder(m, w, m.condition.depth, rngs=rngs)
        context = w
    pooled = int(m.mmdit.pooled_dim)
    if pooled and pooled != context:
      raise UserError(f"model.mmdit.pooled_dim={pooled}: the pooled text here is the mean of the "
                      f"{context}-wide conditioning features; set it to {context} or 0")
    self.pooled = bool(pooled)
    if not m.mmdit.context_dim:
      mcfg.mmdit.context_dim = context
    elif m.mmdit.context_dim != context:
      raise UserError(f"model.mmdit.context_dim={m.mmdit.context_dim}, but the "
                      f"{self.encoder_kind} conditioning is {context} wide: set it to {context} or 0")
    if self.edit == "concat" and not m.mmdit.in_channels:
      mcfg.mmdit.in_channels = 2 * patcher.patch_dim
    self.guidance = bool(m.mmdit.guidance_embed)
    # model.edit_source="residual": the x0 prediction of an edit target is relative to its
    # aligned source (as in the unified model)
    self.edit_residual = m.edit_source == "residual"
    if self.edit_residual and m.prediction != "x0":
      raise UserError("model.edit_source='residual' predicts x0 relative to the source: it needs "
                      "model.prediction='x0'")
    self.mmdit = MMDiT(mcfg, patch_dim=patcher.patch_dim, rngs=rngs)

  # ------------------------------------------------------------------ streams

  def target_tokens(self, batch):
    """The first target image's token positions: (index [B, N], valid [B, N])."""
    return first_positions(batch["modality"] == NOISED_IMAGE, self.tokens)

  def _reference_tokens(self, batch):
    """Kontext: the positions of up to `references` condition images of N tokens each."""
    image, seg = batch["image_ids"], batch["segment_ids"]
    clean = (batch["modality"] == CLEAN_IMAGE) & (image > 0) & (seg > 0)
    first, last = run_bounds(jnp.where(clean, seg * MAX_IMAGE + image, -1 - jnp.arange(image.shape[1])))
    return first_positions(clean & (last - first + 1 == self.tokens), self.references * self.tokens)

  def _text(self, batch):
    """(the row's text tokens [B, L], the text stream's length: model.condition.text_len, or
    0 for as many as the row can hold besides the target)."""
    text = (batch["modality"] == TEXT) & (batch["segment_ids"] > 0)
    return text, self.text_len or text.shape[1] - self.tokens

  def text_positions(self, batch):
    """The text stream's positions in the row, its first text tokens: (index [B, T], valid)."""
    return first_positions(*self._text(batch))

  def row_counts(self, batch):
    """Metrics: rows whose target has a condition image before it (edits), and of those the
    rows whose source image has another size than the target (never used misaligned); rows
    whose text is longer than the text stream (text_cut: its first text_len tokens are read)."""
    out = {}
    if self.encoder_kind in ("text", "llm"):
      text, length = self._text(batch)
      out["text_cut"] = jnp.sum(jnp.sum(text, axis=1) > length)
    idx, ok = self.target_tokens(batch)
    _, has = aligned_source(batch["segment_ids"], batch["modality"], batch["image_ids"])
    clean = (batch["modality"] == CLEAN_IMAGE) & (batch["image_ids"] > 0)
    first = idx[:, 0]
    before = jnp.any(clean & (jnp.arange(clean.shape[1]) < first[:, None]), axis=1) & ok[:, 0]
    aligned = jnp.take_along_axis(has, first[:, None], axis=1)[:, 0]
    return dict(out, edit_rows=jnp.sum(before), edit_unaligned=jnp.sum(before & ~aligned))

  def start_queries(self):
    """MetaQuery: the queries become the frozen LLM's own input at a target image's positions
    when that image is pure noise (t = 1, patches 0): position + modality + time embedding, so
    the LLM reads them as a picture it is asked to draw."""
    n = self.queries.value.shape[0]
    ones = jnp.ones((1, n), jnp.int32)
    x = self.llm.embed_inputs(0 * ones, jnp.zeros((1, n, self.llm.patch_dim), jnp.float32),
                              jnp.ones((1, n), jnp.float32), NOISED_IMAGE * ones,
                              jnp.arange(n)[None], segment_ids=ones, image_ids=ones)
    self.queries.value = x[0].astype(self.queries.value.dtype)

  def _llm(self):
    """The frozen LLM, its parameters behind stop_gradient (no gradient is computed for them)."""
    graphdef, state = nnx.split(self.llm)
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))

  def condition(self, batch, target_idx, target_ok):
    """(features [B, Lt, C], mask [B, Lt]) of the text stream."""
    tokens, modality = batch["tokens"], batch["modality"]
    if self.encoder_kind == "text":
      idx, ok = self.text_positions(batch)
      return self.text_encoder(gather(tokens, idx), ok), ok
    if self.encoder_kind in ("seed", "vq"):  # the target itself: its codes (a decoder)
      features = (self.seed(gather(batch["patches"], target_idx)) if self.encoder_kind == "seed"
                  else self.code_features(batch["codes"]))
      return features, jnp.broadcast_to(target_ok[:, :1], features.shape[:2])
    target = modality == NOISED_IMAGE
    patches = jnp.where(target[..., None], 0.0, batch["patches"])  # the LLM never sees a target
    replace = embeds = None
    if self.encoder_kind == "metaquery":
      replace = target
      embeds = jnp.take(self.queries.value, batch["patch_index"], axis=0)
    h, _ = self._llm().hidden(tokens, patches, jnp.zeros(tokens.shape, jnp.float32), modality,
                              batch["image_ids"], batch["patch_index"], batch["segment_ids"],
                              batch["positions"], replace=replace, embeds=embeds)
    if self.encoder_kind == "llm":
      idx, ok = self.text_positions(batch)
      return jax.lax.stop_gradient(gather(h, idx)), ok
    q = gather(h, target_idx).astype(self.connector_in.value.dtype) @ self.connector_in.value
    return self.connector(q, target_ok), target_ok

  def __call__(self, batch, x_t, t, guidance=None):
    """The model's prediction (model.prediction: velocity or x0; with model.edit_source
    "residual" an x0 relative to the aligned source) for the target tokens: x_t [B, N, D] the
    noised target, t [B] -> [B, N, D] float32."""
    idx, ok = self.target_tokens(batch)
    txt, txt_mask = self.condition(batch, idx, ok)
    dtype = txt.dtype
    img, img_mask = x_t.astype(dtype), ok
    frames = [0]
    source = None
    if self.edit == "concat" or self.edit_residual:
      src, has = aligned_source(batch["segment_ids"], batch["modality"], batch["image_ids"])
      source = gather(jnp.where(has[..., None], gather(batch["patches"], src), 0.0), idx)
    if self.edit == "concat":
      img = jnp.concatenate([img, source.astype(dtype)], axis=-1)
    if self.references:
      ref, ref_ok = self._reference_tokens(batch)
      img = jnp.concatenate([img, gather(batch["patches"], ref).astype(dtype)], axis=1)
      img_mask = jnp.concatenate([img_mask, ref_ok], axis=1)
      frames += list(range(1, self.references + 1))
    out = self._denoise(img, img_mask, frames, txt, txt_mask, t, guidance)
    return out + source.astype(jnp.float32) if self.edit_residual else out

  def code_features(self, codes):
    """Code ids [B, Q] -> the text stream [B, Q, width]: the query tokenizer's codes (seed) or
    the VQ codes through the code encoder (vq)."""
    if self.encoder_kind == "seed":
      return self.seed.embed(codes)
    return self.code_encoder(codes, jnp.ones(codes.shape, bool))

  def from_codes(self, codes, x_t, t):
    """The decoder of SEED-LLaMA / X-Omni: the prediction for x_t [B, N, D] at t [B]
    conditioned on code ids [B, Q] (what `condition` gives for an image whose codes they are)."""
    txt = self.code_features(codes)
    return self._denoise(x_t.astype(txt.dtype), jnp.ones(x_t.shape[:2], bool), [0], txt,
                         jnp.ones(codes.shape, bool), t, None)

  def _denoise(self, img, img_mask, frames, txt, txt_mask, t, guidance):
    """The MMDiT over the two streams; its prediction for the N target tokens, float32."""
    g = self.grid
    img_ids = np.concatenate([self.mmdit.image_ids(g, g, frame=f) for f in frames])
    txt_ids = self.mmdit.text_ids(txt.shape[1], g, g)
    if self.encoder_kind == "metaquery":  # query i carries the place of the image token it replaced
      txt_ids = self.mmdit.image_ids(g, g)
    dtype = txt.dtype
    b = img.shape[0]
    pooled = None
    if self.pooled:
      m = txt_mask[..., None].astype(jnp.float32)
      pooled = (jnp.sum(txt.astype(jnp.float32) * m, 1) / jnp.maximum(jnp.sum(m, 1), 1.0)).astype(dtype)
    if self.guidance and guidance is None:
      guidance = jnp.ones((b,), jnp.float32)
    out = self.mmdit(img, txt, t, jnp.broadcast_to(jnp.asarray(img_ids), (b,) + img_ids.shape),
                     jnp.broadcast_to(jnp.asarray(txt_ids), (b,) + txt_ids.shape), img_mask, txt_mask,
                     pooled=pooled, guidance=guidance if self.guidance else None)
    return out[:, :self.tokens].astype(jnp.float32)


def frozen_params(params):
  """True for the frozen LLM's parameters (no update; the optimizer masks them)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: str(getattr(path[0], "key", path[0])) == "llm", params)
