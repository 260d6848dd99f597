"""The multimodal diffusion transformer (model.family="mmdit"): SD3, FLUX.1 and Qwen-Image.

Two streams, text (conditioning features) and image (patch vectors), each with its own
adaLN-Zero modulation, q/k/v, output projection and GELU-tanh MLP, meet in one joint
attention over the sequence [txt; img] (`DoubleBlock`). FLUX continues with single-stream
blocks over that concatenation (parallel attention + MLP, `SingleBlock`). The modulation of
every block comes from one vector: the timestep embedding, plus the distilled guidance scale
(FLUX.1-dev) and the pooled text vector (CLIP: FLUX, SD3). The output is the velocity
(`unimm.objectives.flow`: x_t = (1-t) x0 + t eps, v = eps - x0) of every image token.

    model(img, txt, t, img_ids, txt_ids, img_mask, txt_mask, pooled=None, guidance=None)
      img      [B, Li, in]   patch vectors: x_t of the target, then any reference images (Kontext)
      txt      [B, Lt, context_dim]  conditioning features (T5, Qwen2.5-VL hidden states)
      t        [B] in [0, 1] (1 = noise; scaled by 1000 inside, as diffusers does)
      img_ids  [B, Li, 3], txt_ids [B, Lt, 3]  float32 position ids (`image_ids`, `text_ids`)
      img_mask [B, Li], txt_mask [B, Lt]  bool, False = padding (never a key; its outputs
               are don't-care)
      pooled   [B, pooled_dim] (model.mmdit.pooled_dim > 0), guidance [B] raw guidance scale
      -> [B, Li, out] float32

Variants (model.mmdit.variant) differ in positions and a few layers:
  flux  3-axis RoPE (frame, row, col) with adjacent-pair rotation; text ids all 0; a Kontext
        reference image has frame id 1 (the i-th: i).
  qwen  MSRoPE: the same rotation over centred image rows / cols (diffusers QwenEmbedRope,
        scale_rope=True), text on the diagonal after the largest image half-side; RMSNorm on
        the conditioning features; no pooled vector.
  sd3   no RoPE: a 2-D sin-cos table of side model.mmdit.pos_embed_max_size is added to the
        embedded patches. The ids carry each patch's cell of that table, already centre-cropped
        (`image_ids`: (frame, top + row, left + col), diffusers `PatchEmbed.cropped_pos_embed`),
        so the module needs no grid size and rows of different sizes can share a batch. The
        frame id is ignored: a reference image gets the same table as the target. The last
        double block is context_pre_only (its text stream only gives keys / values).

The module is layout-agnostic: a linear in, a linear out. The order of a patch vector is
the checkpoint loader's business (`unimm.interop.diffusers_mmdit`, patch_order).

Attention goes through `layers.attention` with mask ids that make every valid token of a
row see every valid token (one segment, one clean image) and never padding; it runs over the
tokens reordered valid-first (`JointMask`: padded text sits between text and image tokens, and
the flash kernels need the valid ones contiguous), and the outputs go back. model.scan runs
repeated blocks as `jax.lax.scan` over stacked parameters (double and single blocks as two
units; the sd3 context_pre_only block outside); model.remat wraps each block (or scanned
step) in `jax.checkpoint` with `layers.REMAT[model.remat]`.
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from unimm.batch import CLEAN_IMAGE
from unimm.errors import UserError
from unimm.kernels.attention import IMPLS as ATTENTION_IMPLS
from unimm.models import layers
from unimm.models.layers import MaskIds, RMSNorm, param
from unimm.parallel.sharding import constrain

VARIANTS = ("flux", "sd3", "qwen")
T_FREQ_DIM = 256
# SD3's position table: positions i * SD3_POS_BASE / pos_embed_max_size, with the base
# diffusers' PatchEmbed takes from sample_size / patch_size (128 / 2 in every SD3 / SD3.5).
SD3_POS_BASE = 64
ACT = ("batch", "length", "act_embed")


# ------------------------------------------------------------------ pieces

class Dense(nnx.Module):
  """x @ kernel + bias, kernel [n_in, n_out] with logical axes `axes`."""

  def __init__(self, n_in, n_out, axes, *, rngs, zeros=False):
    self.kernel = param(rngs, (n_in, n_out), axes, 1.0 / math.sqrt(n_in), zeros=zeros)
    self.bias = param(rngs, (n_out,), axes[1:], zeros=True)

  def __call__(self, x):
    return x @ self.kernel.value + self.bias.value


class Embed(nnx.Module):
  """linear_2(silu(linear_1(x))): diffusers TimestepEmbedding / PixArtAlphaTextProjection,
  BFL MLPEmbedder (time_in, guidance_in, vector_in)."""

  def __init__(self, n_in, width, *, rngs):
    self.linear_1 = Dense(n_in, width, (None, "embed"), rngs=rngs)
    self.linear_2 = Dense(width, width, ("embed", None), rngs=rngs)

  def __call__(self, x):
    return self.linear_2(jax.nn.silu(self.linear_1(x)))


class Modulation(nnx.Module):
  """n vectors [B, 1, W] from silu(conditioning) [B, W] (adaLN-Zero: zero init)."""

  def __init__(self, width, n, *, rngs):
    self.kernel = param(rngs, (width, n * width), ("embed", None), zeros=True)
    self.bias = param(rngs, (n * width,), (None,), zeros=True)
    self.n = n

  def __call__(self, vec):
    y = vec @ self.kernel.value + self.bias.value
    return [c[:, None, :] for c in jnp.split(y, self.n, axis=-1)]


def layer_norm(x, eps):
  """LayerNorm without affine parameters, in float32."""
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def modulate(x, shift, scale, eps):
  return layer_norm(x, eps) * (1 + scale) + shift


class Attention(nnx.Module):
  """One stream's q/k/v ([W, H, Dh], optional biases and per-head RMSNorm on q and k) and
  output projection (none in the single-stream block and the sd3 context_pre_only text)."""

  def __init__(self, width, heads, head_dim, *, qkv_bias, qk_norm, eps, out, rngs):
    std = 1.0 / math.sqrt(width)
    w = lambda: param(rngs, (width, heads, head_dim), ("embed", "heads", "kv"), std)
    b = lambda: param(rngs, (heads, head_dim), ("heads", "kv"), zeros=True) if qkv_bias else None
    norm = lambda: RMSNorm(head_dim, rngs=rngs, eps=eps) if qk_norm else None
    self.wq, self.wk, self.wv = w(), w(), w()
    self.bq, self.bk, self.bv = b(), b(), b()
    self.q_norm, self.k_norm = norm(), norm()
    self.wo = (param(rngs, (heads, head_dim, width), ("heads", "kv", "embed"),
                     1.0 / math.sqrt(heads * head_dim)) if out else None)
    self.bo = param(rngs, (width,), ("embed",), zeros=True) if out else None

  def qkv(self, x):
    def proj(w, b, norm):
      y = checkpoint_name(jnp.einsum("bld,dhk->blhk", x, w.value), "qkv")
      y = y if b is None else y + b.value
      y = y if norm is None else norm(y)
      return constrain(y, ("batch", "length", "act_heads", None))
    return proj(self.wq, self.bq, self.q_norm), proj(self.wk, self.bk, self.k_norm), proj(
        self.wv, self.bv, None)

  def out(self, o):
    return checkpoint_name(jnp.einsum("blhk,hkd->bld", o, self.wo.value), "attn_out") + self.bo.value


class MLP(nnx.Module):
  """GELU (tanh approximation) MLP with biases."""

  def __init__(self, width, hidden, *, rngs):
    self.w_in = param(rngs, (width, hidden), ("embed", "mlp"), 1.0 / math.sqrt(width))
    self.b_in = param(rngs, (hidden,), ("mlp",), zeros=True)
    self.w_out = param(rngs, (hidden, width), ("mlp", "embed"), 1.0 / math.sqrt(hidden))
    self.b_out = param(rngs, (width,), ("embed",), zeros=True)

  def __call__(self, x):
    h = checkpoint_name(x @ self.w_in.value, "mlp_in") + self.b_in.value
    h = constrain(jax.nn.gelu(h, approximate=True), ("batch", "length", "act_mlp"))
    return checkpoint_name(h @ self.w_out.value, "mlp_out") + self.b_out.value


# ------------------------------------------------------------------ positions

def rope_angles(ids, axes_dims, theta):
  """Rotation angles [B, L, sum(axes_dims) / 2] (float32) of position ids [B, L, A]: axis a
  rotates axes_dims[a] dims at frequencies theta^(-2j / axes_dims[a])."""
  parts = []
  for a, dim in enumerate(axes_dims):
    freqs = (1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)).astype(np.float32)
    parts.append(ids[..., a:a + 1].astype(jnp.float32) * freqs)
  return jnp.concatenate(parts, axis=-1)


def apply_rope(x, cos, sin):
  """Rotary embedding with interleaved (adjacent) pairs (FLUX / Qwen-Image; `layers.rope` is
  rotate-half): x [B, L, H, D], cos / sin [B, L, D/2]; computed in float32."""
  pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  x0, x1 = pairs[..., 0], pairs[..., 1]
  c, s = cos[:, :, None, :], sin[:, :, None, :]
  return jnp.stack([x0 * c - x1 * s, x0 * s + x1 * c], axis=-1).reshape(x.shape).astype(x.dtype)


@functools.lru_cache(maxsize=8)
def sd3_table_1d(width, max_size):
  """[max_size, width/2] float32: the sin-cos embedding of SD3's positions, one axis (the 2-D
  table at (row, col) is concat(this[col], this[row]), diffusers get_2d_sincos_pos_embed)."""
  pos = np.arange(max_size, dtype=np.float32) / np.float32(max_size / SD3_POS_BASE)
  dim = width // 2
  omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
  out = np.outer(pos.astype(np.float64), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1).astype(np.float32)


def sd3_table(width, max_size):
  """The whole 2-D table [max_size^2, width] (diffusers' pos_embed buffer, for export)."""
  t = sd3_table_1d(width, max_size)
  rows, cols = np.meshgrid(np.arange(max_size), np.arange(max_size), indexing="ij")
  return np.concatenate([t[cols.reshape(-1)], t[rows.reshape(-1)]], axis=1)


def timestep_features(t, scale_last=False):
  """[B, 256] float32 sinusoidal features of 1000 t, cos half first (diffusers Timesteps with
  flip_sin_to_cos=True, downscale_freq_shift=0). scale_last: 1000 * (t * f) as Qwen-Image's
  Timesteps(scale=1000) rounds it; else (1000 t) * f as FLUX and SD3 do."""
  if not scale_last:
    return layers.timestep_embedding(t, T_FREQ_DIM)
  half = T_FREQ_DIM // 2
  freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * (t.astype(jnp.float32)[..., None] * freqs)
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class JointMask(NamedTuple):
  """Who attends to whom in the joint sequence [txt; img]. The attention runs over the tokens
  in `order` (valid ones first, then padding) so that the valid tokens form one contiguous
  run, as the flash kernels' tile ranges need (`unimm.kernels.mask`: each segment and image
  contiguous); `ids` are the mask ids in that order: every valid token in segment 1, one clean
  image, position 0 (all see all), padding segment 0, image 0 (seen by no valid token)."""
  ids: MaskIds
  order: jax.Array    # [B, L] int32: the joint index of the token at each attention position
  restore: jax.Array  # [B, L] int32: the attention position of each joint index


def joint_mask(txt_mask, img_mask):
  valid = jnp.concatenate([txt_mask, img_mask], axis=1)
  order = jnp.argsort(jnp.logical_not(valid), axis=1, stable=True).astype(jnp.int32)
  v = jnp.take_along_axis(valid, order, axis=1).astype(jnp.int32)
  ids = MaskIds(segment=v, modality=v * CLEAN_IMAGE, image=v, position=jnp.zeros_like(v))
  return JointMask(ids, order, jnp.argsort(order, axis=1).astype(jnp.int32))


def joint_attention(q, k, v, mask: JointMask, rope, impl):
  """Attention over the joint sequence (q, k, v [B, L, H, D] in [txt; img] order), RoPE first."""
  if rope is not None:
    q, k = apply_rope(q, *rope), apply_rope(k, *rope)
  gather = lambda x, index: jnp.take_along_axis(x, index[:, :, None, None], axis=1)
  q, k, v = (gather(x, mask.order) for x in (q, k, v))
  o = checkpoint_name(layers.attention(q, k, v, mask.ids, mask.ids, impl), "context")
  return constrain(gather(o, mask.restore), ("batch", "length", "act_heads", None))


# ------------------------------------------------------------------ blocks

class DoubleBlock(nnx.Module):
  """Per-stream adaLN-Zero (shift, scale, gate for attention, then for the MLP), q/k/v and
  MLP; one joint attention over [txt; img]. context_pre_only (sd3's last block): the text
  stream is modulated by (scale, shift) only and gives keys / values; its output is dropped."""

  def __init__(self, dims, *, context_pre_only=False, rngs):
    w, f = dims["width"], dims["mlp"]
    attn = functools.partial(Attention, w, dims["heads"], dims["head_dim"], qkv_bias=dims["qkv_bias"],
                             qk_norm=dims["qk_norm"], eps=dims["eps"], rngs=rngs)
    self.img_mod = Modulation(w, 6, rngs=rngs)
    self.txt_mod = Modulation(w, 2 if context_pre_only else 6, rngs=rngs)
    self.img_attn = attn(out=True)
    self.txt_attn = attn(out=not context_pre_only)
    self.img_mlp = MLP(w, f, rngs=rngs)
    self.txt_mlp = None if context_pre_only else MLP(w, f, rngs=rngs)
    self.context_pre_only = context_pre_only
    self.eps, self.impl = dims["eps"], dims["impl"]

  def __call__(self, img, txt, vec, mask, rope):
    eps = self.eps
    i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
    if self.context_pre_only:
      t_scale1, t_shift1 = self.txt_mod(vec)
    else:
      t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
    iq, ik, iv = self.img_attn.qkv(modulate(img, i_shift1, i_scale1, eps))
    tq, tk, tv = self.txt_attn.qkv(modulate(txt, t_shift1, t_scale1, eps))
    cat = lambda a, b: jnp.concatenate([a, b], axis=1)
    o = joint_attention(cat(tq, iq), cat(tk, ik), cat(tv, iv), mask, rope, self.impl)
    lt = txt.shape[1]
    img = constrain(img + i_gate1 * self.img_attn.out(o[:, lt:]), ACT)
    img = constrain(img + i_gate2 * self.img_mlp(modulate(img, i_shift2, i_scale2, eps)), ACT)
    if not self.context_pre_only:
      txt = constrain(txt + t_gate1 * self.txt_attn.out(o[:, :lt]), ACT)
      txt = constrain(txt + t_gate2 * self.txt_mlp(modulate(txt, t_shift2, t_scale2, eps)), ACT)
    return img, txt


class SingleBlock(nnx.Module):
  """FLUX single-stream block over [txt; img]: one modulation (shift, scale, gate), attention
  and MLP side by side from the same input, out = attn_out(attention) + mlp_out(gelu(mlp_in))
  (diffusers' proj_out over their concatenation, split by its input columns)."""

  def __init__(self, dims, *, rngs):
    w, f, h, d = dims["width"], dims["mlp"], dims["heads"], dims["head_dim"]
    self.mod = Modulation(w, 3, rngs=rngs)
    self.attn = Attention(w, h, d, qkv_bias=dims["qkv_bias"], qk_norm=dims["qk_norm"],
                          eps=dims["eps"], out=False, rngs=rngs)
    self.mlp_in = param(rngs, (w, f), ("embed", "mlp"), 1.0 / math.sqrt(w))
    self.mlp_in_bias = param(rngs, (f,), ("mlp",), zeros=True)
    self.attn_out = param(rngs, (h, d, w), ("heads", "kv", "embed"), 1.0 / math.sqrt(w + f))
    self.mlp_out = param(rngs, (f, w), ("mlp", "embed"), 1.0 / math.sqrt(w + f))
    self.out_bias = param(rngs, (w,), ("embed",), zeros=True)
    self.eps, self.impl = dims["eps"], dims["impl"]

  def __call__(self, x, vec, mask, rope):
    shift, scale, gate = self.mod(vec)
    y = modulate(x, shift, scale, self.eps)
    o = joint_attention(*self.attn.qkv(y), mask, rope, self.impl)
    m = checkpoint_name(y @ self.mlp_in.value, "mlp_in") + self.mlp_in_bias.value
    m = constrain(jax.nn.gelu(m, approximate=True), ("batch", "length", "act_mlp"))
    out = (checkpoint_name(jnp.einsum("blhk,hkd->bld", o, self.attn_out.value), "attn_out")
           + checkpoint_name(m @ self.mlp_out.value, "mlp_out") + self.out_bias.value)
    return constrain(x + gate * out, ACT)


def run_blocks(blocks, carry, step, *, scan, remat):
  """carry through `blocks` in order, `step(block, carry) -> carry`. scan: runs of blocks of
  one structure (`layers.scan_units`) as `jax.lax.scan` over their stacked parameters; a
  block unlike its neighbours (sd3's context_pre_only) runs on its own. remat: each block
  (or scanned step) under `jax.checkpoint` with `layers.REMAT[remat]`."""
  policy = layers.REMAT[layers.check_remat(remat)]

  def body(graphs):
    def apply(carry, states):
      for graph, state in zip(graphs, states):
        carry = step(nnx.merge(graph, state), carry)
      return carry, None
    return apply if remat == "none" else jax.checkpoint(apply, policy=policy)

  def plain(block, carry):
    graph, state = nnx.split(block)
    return body((graph,))(carry, (state,))[0]

  if not scan:
    for block in blocks:
      carry = plain(block, carry)
    return carry
  for first, period, repeats in layers.scan_units(blocks):
    if repeats == 1:
      for block in blocks[first:first + period]:
        carry = plain(block, carry)
      continue
    split = [nnx.split(blocks[first + i]) for i in range(period * repeats)]
    graphs = tuple(g for g, _ in split[:period])
    stacked = [jax.tree.map(lambda *xs: jnp.stack(xs),
                            *[split[t * period + j][1] for t in range(repeats)])
               for j in range(period)]
    carry, _ = jax.lax.scan(body(graphs), carry, stacked)
  return carry


# ------------------------------------------------------------------ the model

class MMDiT(nnx.Module):

  def __init__(self, cfg, *, patch_dim, rngs):
    """cfg: the `model` section of the config (model.mmdit holds the MMDiT fields);
    patch_dim: the image tokenizer's patch vector width (model.mmdit.in_channels /
    out_channels replace it when set)."""
    m = cfg.mmdit
    if m.variant not in VARIANTS:
      raise UserError(f"model.mmdit.variant='{m.variant}' is unknown: use one of {', '.join(VARIANTS)}")
    if cfg.attention not in ATTENTION_IMPLS:
      raise UserError(f"model.attention='{cfg.attention}' is unknown: use one of "
                      f"{', '.join(ATTENTION_IMPLS)}")
    width, heads = cfg.width, cfg.heads
    head_dim = cfg.head_dim or width // heads
    if heads * head_dim != width:
      raise UserError(f"model.width={width} is not model.heads={heads} x head_dim={head_dim}: the "
                      "MMDiT's hidden width is heads * head_dim; change one of them")
    axes_dims = tuple(int(a) for a in m.axes_dims)
    if m.variant != "sd3" and (sum(axes_dims) != head_dim or any(a % 2 for a in axes_dims)):
      raise UserError(f"model.mmdit.axes_dims={axes_dims}: RoPE dims per axis must be even and sum to "
                      f"head_dim={head_dim}")
    if m.variant == "sd3" and (m.pos_embed_max_size <= 0 or width % 4):
      raise UserError(f"model.mmdit.variant='sd3' needs model.mmdit.pos_embed_max_size > 0 (192 for "
                      f"SD3-Medium) and a width divisible by 4 (got {m.pos_embed_max_size}, {width})")
    if m.variant == "sd3" and m.single_depth:
      raise UserError("model.mmdit.variant='sd3' has no single-stream blocks (its last double block "
                      "drops the text stream): set model.mmdit.single_depth=0")
    if m.variant == "qwen" and m.pooled_dim:
      raise UserError("model.mmdit.variant='qwen' takes no pooled text vector: set "
                      "model.mmdit.pooled_dim=0")
    self.variant, self.axes_dims = m.variant, axes_dims
    self.width, self.heads, self.head_dim = width, heads, head_dim
    self.rope_theta, self.pos_embed_max_size = float(cfg.rope_theta), int(m.pos_embed_max_size)
    self.scan, self.remat = bool(cfg.scan), layers.check_remat(cfg.remat)
    self.in_channels = int(m.in_channels or patch_dim)
    self.out_channels = int(m.out_channels or patch_dim)
    if self.in_channels <= 0 or self.out_channels <= 0:
      raise UserError("the MMDiT needs patch vectors: set model.mmdit.in_channels / out_channels (64 "
                      "for 16-channel latents in 2 x 2 patches) or use an image tokenizer with patches")
    self.context_dim = int(m.context_dim or width)
    self.pooled_dim = int(m.pooled_dim)
    self.eps = cfg.norm_eps
    dims = dict(width=width, heads=heads, head_dim=head_dim, mlp=int(width * m.mlp_ratio),
                qkv_bias=bool(cfg.qkv_bias), qk_norm=bool(cfg.qk_norm), eps=cfg.norm_eps,
                impl=cfg.attention)

    self.img_in = Dense(self.in_channels, width, ("patch", "embed"), rngs=rngs)
    self.txt_norm = (RMSNorm(self.context_dim, rngs=rngs, eps=cfg.norm_eps)
                     if m.variant == "qwen" else None)
    self.txt_in = Dense(self.context_dim, width, (None, "embed"), rngs=rngs)
    self.time_in = Embed(T_FREQ_DIM, width, rngs=rngs)
    self.guidance_in = Embed(T_FREQ_DIM, width, rngs=rngs) if m.guidance_embed else None
    self.vector_in = Embed(self.pooled_dim, width, rngs=rngs) if self.pooled_dim else None
    self.double_blocks = nnx.List([
        DoubleBlock(dims, context_pre_only=m.variant == "sd3" and i == cfg.depth - 1, rngs=rngs)
        for i in range(cfg.depth)])
    self.single_blocks = nnx.List([SingleBlock(dims, rngs=rngs) for _ in range(m.single_depth)])
    self.final_mod = Modulation(width, 2, rngs=rngs)  # (scale, shift), diffusers' norm_out order
    self.proj_out = Dense(width, self.out_channels, ("embed", "patch"), rngs=rngs, zeros=True)

  # -- position ids (numpy, float32)

  def image_ids(self, rows, cols, frame=0):
    """[rows * cols, 3] float32 ids of a rows x cols patch grid (row-major): (frame, row, col).
    flux: as is; frame 1, 2, ... marks the Kontext reference images. qwen: rows / cols centred
    as diffusers QwenEmbedRope(scale_rope=True) (row r -> r - ceil(rows / 2)); frame = the
    image's index in img_shapes (0 the target, i the i-th reference image of an edit). sd3:
    the patch's cell in the pos_embed_max_size table, centre-cropped as diffusers does; the
    frame id is kept but not used."""
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    if self.variant == "qwen":
      r, c = r - (rows - rows // 2), c - (cols - cols // 2)
    elif self.variant == "sd3":
      size = self.pos_embed_max_size
      if rows > size or cols > size:
        raise UserError(f"a {rows} x {cols} patch grid does not fit SD3's {size} x {size} position "
                        "table (model.mmdit.pos_embed_max_size): use a smaller image")
      r, c = r + (size - rows) // 2, c + (size - cols) // 2
    ids = np.stack([np.full_like(r, frame), r, c], axis=-1).reshape(-1, 3)
    return ids.astype(np.float32)

  def text_ids(self, n, rows, cols):
    """[n, 3] float32 ids of n text tokens. flux / sd3: zeros. qwen: token j at m + j on all
    three axes with m = max(rows // 2, cols // 2) over the row's images (rows / cols: ints,
    or sequences with one entry per image), where diffusers QwenEmbedRope starts the text."""
    if self.variant != "qwen":
      return np.zeros((n, 3), np.float32)
    rows, cols = np.atleast_1d(rows), np.atleast_1d(cols)
    start = max(max(int(r) // 2, int(c) // 2) for r, c in zip(rows, cols))
    return np.repeat((start + np.arange(n, dtype=np.float32))[:, None], 3, axis=1)

  # -- forward

  def _pos_embed(self, img_ids, dtype):
    table = jnp.asarray(sd3_table_1d(self.width, self.pos_embed_max_size))
    row = img_ids[..., 1].astype(jnp.int32)
    col = img_ids[..., 2].astype(jnp.int32)
    return jnp.concatenate([jnp.take(table, col, axis=0, mode="clip"),
                            jnp.take(table, row, axis=0, mode="clip")], axis=-1).astype(dtype)

  def conditioning(self, t, pooled=None, guidance=None):
    """The vector [B, W] every block's modulation reads: time (+ guidance) (+ pooled text)."""
    dtype = self.time_in.linear_1.kernel.value.dtype
    temb = self.time_in(timestep_features(t, self.variant == "qwen").astype(dtype))
    if self.guidance_in is not None:
      if guidance is None:
        raise UserError("this MMDiT embeds the guidance scale (model.mmdit.guidance_embed): "
                        "pass guidance")
      temb = temb + self.guidance_in(timestep_features(guidance).astype(dtype))
    elif guidance is not None:
      raise UserError("guidance given but model.mmdit.guidance_embed is False")
    if self.vector_in is not None:
      if pooled is None:
        raise UserError(f"this MMDiT adds a pooled text vector (model.mmdit.pooled_dim="
                        f"{self.pooled_dim}): pass pooled")
      temb = temb + self.vector_in(pooled.astype(dtype))
    elif pooled is not None:
      raise UserError("pooled given but model.mmdit.pooled_dim is 0")
    return temb

  def __call__(self, img, txt, t, img_ids, txt_ids, img_mask, txt_mask, pooled=None, guidance=None):
    """-> velocity [B, Li, out_channels], float32 (see the module docstring)."""
    dtype = self.img_in.kernel.value.dtype
    x = self.img_in(img.astype(dtype))
    if self.variant == "sd3":
      x = x + self._pos_embed(img_ids, dtype)
    x = constrain(x, ACT)
    c = txt.astype(dtype)
    if self.txt_norm is not None:
      c = self.txt_norm(c)
    c = constrain(self.txt_in(c), ACT)
    vec = jax.nn.silu(self.conditioning(t, pooled, guidance))
    mask = joint_mask(txt_mask, img_mask)
    rope = None
    if self.variant != "sd3":
      angles = rope_angles(jnp.concatenate([txt_ids, img_ids], axis=1), self.axes_dims, self.rope_theta)
      rope = (jnp.cos(angles), jnp.sin(angles))

    def double(block, carry):
      return block(*carry, vec, mask, rope)

    x, c = run_blocks(self.double_blocks, (x, c), double, scan=self.scan, remat=self.remat)
    if len(self.single_blocks):
      lt = c.shape[1]
      joint = run_blocks(self.single_blocks, jnp.concatenate([c, x], axis=1),
                         lambda block, h: block(h, vec, mask, rope), scan=self.scan, remat=self.remat)
      x = joint[:, lt:]
    scale, shift = self.final_mod(vec)
    return self.proj_out(modulate(x, shift, scale, self.eps)).astype(jnp.float32)


class _ShapeOnlyRngs:
  """Stands in for nnx.Rngs where only shapes matter: one fixed key for every parameter (under
  eval_shape each draw from an nnx.Rngs searches the whole trace so far: 10-30 s instead of
  about 1 s for a full-size model)."""

  def params(self):
    return jax.random.key(0)


def parameter_count(cfg, patch_dim):
  """Parameters of the MMDiT of `cfg` (the model section, or a whole config), from
  `nnx.eval_shape` (nothing allocated)."""
  cfg = cfg.model if "model" in cfg else cfg
  model = nnx.eval_shape(lambda: MMDiT(cfg, patch_dim=patch_dim, rngs=_ShapeOnlyRngs()))
  return sum(math.prod(p.value.shape) for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)))
