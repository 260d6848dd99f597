"""The unified transformer (Transfusion family).

One decoder reads a packed sequence in which text tokens and image patches sit
side by side (`<boi>` patches `<eoi>`). Text positions embed token ids; image
positions embed their patch vector plus a 2-D patch-position embedding, a
modality embedding (clean context vs noised target) and a timestep embedding.
The same residual stream feeds two heads: next-token logits and a flow head
that predicts, per image position, the velocity `eps - x0` or the clean patch
`x0` (config `model.prediction`). The attention mask is built from ids (see
`layers.attention_mask`); RoPE rotates by the sequence position and, with
`model.image_rope_2d`, also by each patch's (row, col).

Inputs (all [B, L] unless noted): tokens, patches [B, L, D] (x_t at noised
positions, x0 at clean ones), t (per token, 0 for clean images and text),
modality, image_ids, patch_index, segment_ids, positions.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from unimm.batch import TEXT
from unimm.errors import UserError
from unimm.models.image_tokenizer import image_tokenizer
from unimm.kernels.attention import IMPLS as ATTENTION_IMPLS
from unimm.models.layers import (Block, MaskIds, RMSNorm, TokenDiffusionHead, aligned_source,
                                 check_remat, param, run_blocks, timestep_embedding)
from unimm.parallel.sharding import constrain

T_FREQ_DIM = 256
EDIT_SOURCES = ("none", "input", "residual")


class UnifiedTransformer(nnx.Module):

  def __init__(self, cfg, *, vocab_size, patch_dim, patch_grid, rngs, code_offset=None, mask_id=None):
    """patch_grid = (rows, cols): the position table of image patches (the
    image tokenizer's max_rows, max_cols; patch_index = row * cols + col).
    code_offset: with vq image tokens, the first code id (ids >= it are image codes
    or the mask id, embedded from the token table plus their patch position)."""
    w = cfg.width
    if w % cfg.heads and not cfg.head_dim:
      raise UserError(f"model.width={w} is not a multiple of model.heads={cfg.heads}: change "
                      "one of them or set model.head_dim")
    if cfg.attention not in ATTENTION_IMPLS:
      raise UserError(f"model.attention='{cfg.attention}' is unknown: use one of "
                      f"{', '.join(ATTENTION_IMPLS)}")
    self.heads, self.width, self.depth = cfg.heads, cfg.width, cfg.depth
    self.scan, self.remat = bool(cfg.scan), check_remat(cfg.remat)
    self.grid = int(patch_grid[1])
    self.image_rope_2d = bool(cfg.image_rope_2d)
    self.vocab_size, self.patch_dim = vocab_size, patch_dim
    self.code_offset, self.mask_id = code_offset, mask_id
    # text diffusion (MMaDA): every document bidirectional, its noised images still hidden
    self.bidirectional = getattr(cfg, "text_loss", "next_token") != "next_token"
    self.embed = param(rngs, (vocab_size, w), ("vocab", "embed"), 1.0)
    # (none when images are codes only: a zero-size parameter cannot be checkpointed)
    self.patch_in = (param(rngs, (patch_dim, w), ("patch", "embed"), 1.0 / math.sqrt(patch_dim))
                     if patch_dim else None)
    self.patch_pos = param(rngs, (patch_grid[0] * patch_grid[1], w), ("positions", "embed"), 0.02)
    self.modality_embed = param(rngs, (3, w), (None, "embed"), 0.02)
    flow = code_offset is None  # the timestep embedding and the flow head serve flow models only
    # (not MAR's transformer: it never sees t; its per-token diffusion MLP embeds t itself. A
    # timestep input that is always 0 became a large constant on every image token, 3x the
    # patches' spread, and captions stopped reading the image)
    timed = flow and getattr(cfg, "image_loss", "flow") != "mar"
    self.t_in = param(rngs, (T_FREQ_DIM, w), (None, "embed"), 1.0 / math.sqrt(T_FREQ_DIM)) if timed else None
    self.t_out = param(rngs, (w, w), ("embed", None), 1.0 / math.sqrt(w)) if timed else None
    # Janus-Pro's understanding encoder: blocks over each condition image's pixel patches alone
    self.vit = nnx.List([Block(_dense(cfg), rngs=rngs, modality_experts=False)
                         for _ in range(getattr(cfg, "vit_depth", 0))])
    self.blocks = nnx.List([Block(cfg, rngs=rngs, layer=i) for i in range(cfg.depth)])
    self.final_norm = RMSNorm(w, rngs=rngs, eps=cfg.norm_eps)
    # tied: the logits are the residual stream times the transposed embedding table
    self.lm_head = (None if cfg.tie_embeddings else
                    param(rngs, (w, vocab_size), ("embed", "vocab"), 1.0 / math.sqrt(w)))
    # Harmon / MAR (model.image_loss "mar"): masked target tokens embed a learned mask vector, a
    # per-token diffusion MLP (not a linear flow head) draws each from the transformer's output
    self.mar = getattr(cfg, "image_loss", "flow") == "mar"
    self.flow_head = (param(rngs, (w, patch_dim), ("embed", "patch"), zeros=True)
                      if flow and not self.mar else None)
    self.mask_embed = param(rngs, (w,), ("embed",), 0.02) if self.mar else None
    self.mar_head = (TokenDiffusionHead(patch_dim, w, cfg.mar.head_width, cfg.mar.head_depth,
                                        rngs=rngs) if self.mar else None)
    # editing (model.edit_source): a noised target patch also embeds the clean patch at its place
    # in the document's last condition image (InstructPix2Pix's channel concatenation, as a sum;
    # initialised like patch_in, last so that the other parameters keep their initial values);
    # "residual": the x0 prediction is relative to that source patch
    edit = getattr(cfg, "edit_source", "none")
    if edit not in EDIT_SOURCES:
      raise UserError(f"model.edit_source='{edit}' is unknown: use one of {', '.join(EDIT_SOURCES)}")
    if edit == "residual" and cfg.prediction != "x0":
      raise UserError("model.edit_source='residual' predicts x0 relative to the source: it needs "
                      "model.prediction='x0'")
    self.source_in = (param(rngs, (patch_dim, w), ("patch", "embed"), 1.0 / math.sqrt(patch_dim))
                      if flow and patch_dim and edit != "none" else None)
    self.edit_residual = edit == "residual" and flow and bool(patch_dim)

  def embed_inputs(self, tokens, patches, t, modality, patch_index, segment_ids=None, image_ids=None):
    """Text ids -> the token table; image codes (vq) -> the token table plus their patch
    position; pixel or latent patches -> patch projection + position + modality + time (+ the
    aligned source patch of an edit target, model.edit_source)."""
    dtype = self.embed.value.dtype
    text = jnp.take(self.embed.value, tokens, axis=0)
    pos = jnp.take(self.patch_pos.value, patch_index, axis=0)
    img = pos + jnp.take(self.modality_embed.value, modality, axis=0)
    if self.patch_in is not None:
      img = img + patches.astype(dtype) @ self.patch_in.value
    if self.source_in is not None:
      source = self.edit_sources(patches, segment_ids, modality, image_ids).astype(dtype)
      img = img + source @ self.source_in.value
    if self.t_in is not None:  # flow models with a flow head
      # (batch-sharded like the rows: unconstrained, XLA gathers the whole batch's [B, L, 256]
      # to meet t_in's fsdp-sharded columns instead of gathering the weight)
      temb = constrain(timestep_embedding(t, T_FREQ_DIM).astype(dtype), ("batch", "length", None))
      img = img + jax.nn.silu(temb @ self.t_in.value) @ self.t_out.value
    if self.code_offset is None:  # pixel or latent patches (flow, MAR)
      return constrain(jnp.where((modality == TEXT)[..., None], text, img),
                       ("batch", "length", "act_embed"))
    code = tokens >= self.code_offset
    text = text + jnp.where(code[..., None], pos, 0.0).astype(dtype)
    pixels = (modality != TEXT) & ~code
    return constrain(jnp.where(pixels[..., None], img, text), ("batch", "length", "act_embed"))

  def encode_pixels(self, x, ids, modality, tokens, patch_index):
    """The understanding ViT (model.vit_depth blocks): each condition image's pixel-patch
    positions attend only to each other (bidirectional); other positions pass through."""
    pixels = (modality != TEXT) & (tokens < self.code_offset)
    vit_ids = MaskIds(jnp.where(pixels, ids.segment, 0), modality, jnp.where(pixels, ids.image, 0),
                      ids.position)
    h, _, _ = run_blocks(self.vit, x, vit_ids, patch_index, scan=self.scan, remat=self.remat)
    return jnp.where(pixels[..., None], h, x)

  def hidden(self, tokens, patches, t, modality, image_ids, patch_index, segment_ids, positions,
             cache=None, cache_index=None, replace=None, embeds=None):
    """The final-normed residual stream [B, L, W] (compute dtype) and the new cache (or None).
    replace [B, L] bool, embeds [B, L, W]: input embeddings taking the place of those positions'
    own (MetaQuery's learnable queries in a frozen LLM's input).
    Routed blocks' statistics are sown as nnx.Intermediate "router" (one row per routed
    feed-forward; `losses.add_router_losses` pops them)."""
    # (tokens of a document at one position see each other: position 0 makes it bidirectional)
    ids = MaskIds(segment_ids, modality, image_ids,
                  jnp.zeros_like(positions) if self.bidirectional else positions)
    x = self.embed_inputs(tokens, patches, t, modality, patch_index, segment_ids, image_ids)
    if replace is not None:
      x = jnp.where(replace[..., None], embeds.astype(x.dtype), x)
    if len(self.vit):
      x = self.encode_pixels(x, ids, modality, tokens, patch_index)
    rope_pos = self.rope_positions(positions, modality, patch_index)
    x, new_cache, stats = run_blocks(self.blocks, x, ids, rope_pos, scan=self.scan,
                                     remat=self.remat, cache=cache, cache_index=cache_index)
    if stats is not None:
      self.sow(nnx.Intermediate, "router", stats)
    return self.final_norm(x), new_cache

  def mask_embeddings(self, modality, patch_index):
    """MAR: the input embedding of a masked image token, [B, L, W]: the mask vector plus the
    token's patch position and modality (what `embed_inputs` adds to a patch)."""
    return (self.mask_embed.value + jnp.take(self.patch_pos.value, patch_index, axis=0)
            + jnp.take(self.modality_embed.value, modality, axis=0))

  def head(self):
    """The LM head [W, V] (the transposed token table when tied)."""
    return self.embed.value.T if self.lm_head is None else self.lm_head.value

  def edit_sources(self, patches, segment_ids, modality, image_ids):
    """[B, L, D]: at each edit target token the clean patch at its place in the document's last
    condition image (`aligned_source`; a source of another size is never used), else 0."""
    src, ok = aligned_source(segment_ids, modality, image_ids)
    return jnp.where(ok[..., None], jnp.take_along_axis(patches, src[..., None], axis=1), 0.0)

  def flow_out(self, h, patches=None, segment_ids=None, modality=None, image_ids=None):
    """The flow head on the final stream: [B, L, patch_dim] float32 (None without one); with
    model.edit_source="residual" plus the aligned source patches (the batch's `patches` and ids
    given)."""
    if self.flow_head is None:
      return None
    out = (h @ self.flow_head.value).astype(jnp.float32)
    if self.edit_residual:
      out = out + self.edit_sources(patches, segment_ids, modality, image_ids).astype(jnp.float32)
    return out

  def __call__(self, tokens, patches, t, modality, image_ids, patch_index, segment_ids,
               positions, cache=None, cache_index=None):
    """Returns (logits [B, L, V] f32, flow [B, L, D] f32 (None without a flow head),
    new cache or None)."""
    h, new_cache = self.hidden(tokens, patches, t, modality, image_ids, patch_index, segment_ids,
                               positions, cache, cache_index)
    logits = jnp.einsum("bld,dv->blv", h, self.head(), preferred_element_type=jnp.float32)
    flow = self.flow_out(h, patches, segment_ids, modality, image_ids)
    return constrain(logits, ("batch", "length", "act_vocab")), flow, new_cache

  def rope_positions(self, positions, modality, patch_index):
    """RoPE positions: the sequence position, plus (row, col) of image patches
    (0 for text) when model.image_rope_2d, so that a patch and the patch at the
    same place of another image are at relative offset 0 in those dims."""
    if not self.image_rope_2d:
      return positions
    image = modality != TEXT
    row = jnp.where(image, patch_index // self.grid, 0)
    col = jnp.where(image, patch_index % self.grid, 0)
    return jnp.stack([positions, row, col], axis=-1)

  def init_cache(self, batch, length, dtype=jnp.float32):
    """Empty KV cache: per block k/v [B, C, KV heads, Dh] and the mask ids of each slot."""
    attn = self.blocks[0].attn
    shape = (batch, length, attn.kv_heads, attn.head_dim)
    ids = lambda: MaskIds(*(jnp.zeros((batch, length), jnp.int32) for _ in MaskIds._fields))
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype), "ids": ids()}
            for _ in range(self.depth)]


def _dense(cfg):
  """The model config with dense feed-forwards and no modality experts (the ViT's blocks)."""
  dense = cfg.copy_and_resolve_references()
  dense.moe.experts, dense.mot.route = 0, (0,)
  return dense


def build_model(cfg, *, vocab_size, seed=None):
  """The unified model for a full config (model + data fields). vocab_size: the text
  tokenizer's embedding rows, replaced by model.vocab_size when that is set (`Run` checks
  that it covers the tokenizer)."""
  patcher = image_tokenizer(cfg, vocab_size)  # vq codes follow the text tokenizer's ids
  vocab_size = cfg.model.vocab_size or vocab_size
  code_offset = mask_id = None
  if getattr(patcher, "discrete", False):  # the vocabulary grows by the codebook and a mask id
    vocab_size, code_offset, mask_id = patcher.vocab_size(), patcher.code_offset, patcher.mask_id
  model = UnifiedTransformer(
      cfg.model, vocab_size=vocab_size, patch_dim=patcher.patch_dim,
      patch_grid=(patcher.max_rows, patcher.max_cols), code_offset=code_offset, mask_id=mask_id,
      rngs=nnx.Rngs(cfg.seed if seed is None else seed))
  if cfg.model.mot.init_copy:
    copy_text_expert(model)
  return model, patcher


def copy_text_expert(model):
  """Mixture of transformers: every modality expert of every block becomes a copy of the
  block's expert 0 (BAGEL initialises its generation expert from the language model)."""
  for block in model.blocks:
    for expert in block.modality_experts:
      for part in ("attn_norm", "attn", "mlp_norm", "mlp"):
        nnx.update(getattr(expert, part), nnx.state(getattr(block, part), nnx.Param))


def parameter_counts(model, cfg):
  """(total, active per token) parameter counts of a model (concrete or from nnx.eval_shape):
  a routed block counts top_k of its experts as active, a mixture-of-transformers block one
  modality expert."""
  total = active = 0
  for path, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n = math.prod(p.value.shape)
    keys = [str(k) for k in path]
    total += n
    if "modality_experts" in keys:
      continue  # one expert's worth is counted with expert 0
    if len(keys) > 3 and keys[3] in ("w_gate", "w_up", "w_down") and len(p.value.shape) == 3:
      n = n * cfg.moe.top_k // cfg.moe.experts  # routed experts [E, ...]
    active += n
  return total, active
