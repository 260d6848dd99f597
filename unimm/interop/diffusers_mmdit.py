"""diffusers MMDiT checkpoints (FLUX.1, SD3, Qwen-Image) and the original BFL FLUX layout <->
`unimm.models.mmdit.MMDiT`.

The only place that knows these checkpoint layouts:

    model_fields(config_json)        a diffusers config.json -> cfg.model field values
    apply_model_fields(cfg, path)    ... written into cfg.model
    load(path, model_or_state, variant=None, patch_order="hwc")
                                     safetensors weights -> an nnx.State of the model's Params
    export(model_state, cfg, out_dir, max_shard_bytes=10**10, patch_order="hwc")
                                     -> config.json + safetensors that diffusers' from_pretrained loads

`path`: a diffusers directory (config.json + diffusion_pytorch_model.safetensors, or
diffusion_pytorch_model.safetensors.index.json + shards), or one .safetensors file in
diffusers or in BFL layout (flux1-dev.safetensors: double_blocks.*, single_blocks.*,
final_layer.*; an optional "model.diffusion_model." prefix). Weights are read with
safetensors (numpy), bfloat16 ones decoded from their bytes; nothing is unpickled.

Names (torch Linear weights are [out, in]; ours are [in, ...]); diffusers flux / sd3 | qwen | BFL:

    img_in                 x_embedder | pos_embed.proj (sd3, a conv) | img_in | img_in
    txt_norm (qwen)        txt_norm
    txt_in                 context_embedder | txt_in | txt_in
    time_in.linear_1/2     time_text_embed.timestep_embedder.linear_1/2 | time_in.in_layer/out_layer
    guidance_in, vector_in time_text_embed.guidance_embedder / text_embedder | guidance_in / vector_in
    double_blocks.i        transformer_blocks.i | double_blocks.i
      img_mod, txt_mod       norm1.linear, norm1_context.linear | img_mod.1, txt_mod.1
                             | img_mod.lin, txt_mod.lin
      img_attn.wq/bq/...     attn.to_q/k/v [H*Dh, W] -> [W, H, Dh] | img_attn.qkv (rows q, k, v)
      img_attn.q/k_norm      attn.norm_q/k | img_attn.norm.query_norm/key_norm.scale
      img_attn.wo/bo         attn.to_out.0 | img_attn.proj
      txt_attn.*             attn.add_q/k/v_proj, norm_added_q/k, to_add_out | txt_attn.*
      img_mlp, txt_mlp       ff, ff_context (net.0.proj, net.2) | img_mlp, txt_mlp (.net...) | (.0, .2)
    single_blocks.i        single_transformer_blocks.i | single_blocks.i
      mod                    norm.linear | modulation.lin
      attn.wq/.../q_norm     attn.to_q/k/v, attn.norm_q/k | linear1 rows [q, k, v, mlp], norm.*_norm
      mlp_in, mlp_in_bias    proj_mlp | linear1 rows [3W:]
      attn_out, mlp_out      proj_out columns [:W], [W:] | linear2
    final_mod (scale, shift)  norm_out.linear | final_layer.adaLN_modulation.1 (shift, scale: swapped)
    proj_out               proj_out | final_layer.linear

Patch vectors (patch_order): FLUX and Qwen-Image checkpoints take and give latents packed
(c, ph, pw) (the pipelines' _pack_latents); SD3's patch conv and unpatchify use (ph, pw, c).
patch_order="hwc" (default) loads any of them to take and give our (ph, pw, c) patch vectors
of latents in 2 x 2 patches (`unimm.image_grid.patchify`): the img_in rows and proj_out
columns are permuted. FLUX / Qwen inputs wider than the output (channel-concatenated latents:
FLUX Canny / Depth) are taken as in / out packed groups; a layout that is not (FLUX Fill's
packed mask) needs patch_order="chw", which keeps (c, ph, pw) for every variant.
"""

import importlib.metadata
import json
import math
import os
import re
import struct

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unimm.errors import UserError, read_json
from unimm.interop import not_safetensors, pickled_files
from unimm.models.mmdit import SD3_POS_BASE, MMDiT, sd3_table

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
CLASSES = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3",
           "QwenImageTransformer2DModel": "qwen"}
CLASS_OF = {v: k for k, v in CLASSES.items()}
BFL_PREFIX = "model.diffusion_model."
PATCH_ORDERS = ("hwc", "chw")
SD3_PATCH = 2
# checkpoint tensors with no parameter: SD3's sin-cos table (the model computes it)
_IGNORED = ("pos_embed.pos_embed",)


# ---------------------------------------------------------------------------------------------
# config.json <-> model fields


def _read_config(config_json):
  if isinstance(config_json, dict):
    return dict(config_json), "config"
  path = os.fspath(config_json)
  file = os.path.join(path, "config.json") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise UserError(f"{path}: no config.json; a diffusers transformer directory holds config.json "
                    f"and {WEIGHTS}")
  return read_json(file, "download it again", "a diffusers config"), file


def model_fields(config_json) -> dict:
  """cfg.model field values (family="mmdit", the MMDiT shape, model.mmdit.*) of a diffusers
  FluxTransformer2DModel / SD3Transformer2DModel / QwenImageTransformer2DModel config
  (config.json, its directory, or the dict)."""
  hf, where = _read_config(config_json)
  cls = hf.get("_class_name")
  if cls not in CLASSES:
    raise UserError(f"{where}: _class_name {cls!r} is not an MMDiT this loader knows: use a "
                    f"{', '.join(CLASSES)} checkpoint")
  variant = CLASSES[cls]
  get = lambda k, d: d if hf.get(k) is None else hf[k]
  heads, head_dim = int(get("num_attention_heads", 24)), int(get("attention_head_dim", 128))
  width = heads * head_dim
  mmdit = dict(variant=variant, single_depth=0, mlp_ratio=4.0, pooled_dim=0, guidance_embed=False,
               axes_dims=tuple(int(a) for a in get("axes_dims_rope", (16, 56, 56))),
               pos_embed_max_size=0)
  qk_norm = True
  if variant == "flux":
    if int(get("patch_size", 1)) != 1:
      raise UserError(f"{where}: FLUX patch_size={hf['patch_size']} is not supported (only 1: latents "
                      "packed 2 x 2 by the pipeline)")
    in_ch = int(get("in_channels", 64))
    mmdit.update(single_depth=int(get("num_single_layers", 38)),
                 context_dim=int(get("joint_attention_dim", 4096)),
                 pooled_dim=int(get("pooled_projection_dim", 768)),
                 guidance_embed=bool(get("guidance_embeds", False)),
                 in_channels=in_ch, out_channels=int(get("out_channels", in_ch)))
    depth = int(get("num_layers", 19))
  elif variant == "sd3":
    if tuple(get("dual_attention_layers", ())):
      raise UserError(f"{where}: dual_attention_layers={list(hf['dual_attention_layers'])} (MMDiT-X, "
                      "SD3.5-Medium) is not supported: use an SD3 / SD3.5-Large checkpoint")
    qk = get("qk_norm", None)
    if qk not in (None, "rms_norm"):
      raise UserError(f"{where}: qk_norm={qk!r} is not supported (only none or 'rms_norm')")
    qk_norm = qk == "rms_norm"
    p, sample = int(get("patch_size", 2)), int(get("sample_size", 128))
    if p != SD3_PATCH or sample // p != SD3_POS_BASE:
      raise UserError(f"{where}: patch_size={p}, sample_size={sample} are not supported (only 2 and "
                      f"{2 * SD3_POS_BASE}, as in every SD3 / SD3.5)")
    if int(get("caption_projection_dim", 1152)) != width:
      raise UserError(f"{where}: caption_projection_dim={hf.get('caption_projection_dim')} differs from "
                      f"the hidden width {width} (heads x head_dim): not supported")
    if not hf.get("pos_embed_max_size"):
      raise UserError(f"{where}: pos_embed_max_size is not set: only SD3's cropped position table is "
                      "supported")
    mmdit.update(context_dim=int(get("joint_attention_dim", 4096)),
                 pooled_dim=int(get("pooled_projection_dim", 2048)),
                 pos_embed_max_size=int(hf["pos_embed_max_size"]),
                 in_channels=int(get("in_channels", 16)) * p * p,
                 out_channels=int(get("out_channels", 16)) * p * p)
    depth = int(get("num_layers", 18))
  else:
    for key in ("zero_cond_t", "use_additional_t_cond", "use_layer3d_rope", "guidance_embeds"):
      if hf.get(key):
        raise UserError(f"{where}: {key}=true is not supported (Qwen-Image-Edit-2511 / Layered "
                        "variants): use a Qwen-Image checkpoint without it")
    p, in_ch = int(get("patch_size", 2)), int(get("in_channels", 64))
    mmdit.update(context_dim=int(get("joint_attention_dim", 3584)), in_channels=in_ch,
                 out_channels=p * p * int(hf.get("out_channels") or in_ch))
    depth = int(get("num_layers", 60))
  return dict(family="mmdit", width=width, heads=heads, head_dim=head_dim, depth=depth,
              qk_norm=qk_norm, qkv_bias=True, norm_eps=1e-6, rope_theta=10_000.0, mmdit=mmdit)


def apply_model_fields(cfg, path) -> dict:
  """Sets cfg.model's MMDiT fields from the diffusers config at `path`; returns them."""
  fields = model_fields(path)
  for key, value in fields.items():
    if key == "mmdit":
      for k, v in value.items():
        cfg.model.mmdit[k] = v
    else:
      cfg.model[key] = value
  return fields


def _diffusers_config(cfg, dims):
  """The diffusers config.json of an MMDiT of model config `cfg`."""
  m = cfg.mmdit
  variant = m.variant

  def need(ok, what):
    if not ok:
      raise UserError(f"a {CLASS_OF[variant]} has {what}: this model cannot be exported to diffusers")

  need(cfg.qkv_bias, "q/k/v biases (model.qkv_bias=True)")
  need(float(m.mlp_ratio) == 4.0, "mlp_ratio 4 (model.mmdit.mlp_ratio)")
  need(abs(float(cfg.norm_eps) - 1e-6) < 1e-12, "norm eps 1e-6 (model.norm_eps)")
  try:
    version = importlib.metadata.version("diffusers")
  except importlib.metadata.PackageNotFoundError:
    version = "0.42.1"
  heads = int(cfg.heads)
  head_dim = int(cfg.head_dim or cfg.width // heads)
  if heads * head_dim != dims["width"]:
    raise UserError(f"the parameters have width {dims['width']} but the config says heads={heads} x "
                    f"head_dim={head_dim}: pass the config the model was built from")
  out = {"_class_name": CLASS_OF[variant], "_diffusers_version": version,
         "num_layers": int(cfg.depth), "attention_head_dim": head_dim, "num_attention_heads": heads,
         "joint_attention_dim": dims["context"]}
  if variant != "sd3":
    need(cfg.qk_norm, "QK RMSNorm (model.qk_norm=True)")
    need(float(cfg.rope_theta) == 10_000.0, "RoPE theta 10000 (model.rope_theta)")
    out["axes_dims_rope"] = [int(a) for a in m.axes_dims]
  if variant == "flux":
    need(m.pooled_dim > 0, "a pooled text vector (model.mmdit.pooled_dim > 0)")
    out.update(patch_size=1, in_channels=dims["in"], out_channels=dims["out"],
               num_single_layers=int(m.single_depth), pooled_projection_dim=int(m.pooled_dim),
               guidance_embeds=bool(m.guidance_embed))
  elif variant == "sd3":
    need(m.pooled_dim > 0 and not m.guidance_embed,
         "a pooled text vector and no guidance embedding (model.mmdit.pooled_dim, guidance_embed)")
    need(dims["in"] % 4 == 0 and dims["out"] % 4 == 0,
         "2 x 2 patches (in / out channels divisible by 4)")
    out.update(sample_size=2 * SD3_POS_BASE, patch_size=SD3_PATCH, in_channels=dims["in"] // 4,
               out_channels=dims["out"] // 4, caption_projection_dim=dims["width"],
               pooled_projection_dim=int(m.pooled_dim), pos_embed_max_size=int(m.pos_embed_max_size),
               dual_attention_layers=[], qk_norm="rms_norm" if cfg.qk_norm else None)
  else:
    need(not m.guidance_embed and not m.pooled_dim, "no guidance embedding and no pooled vector")
    need(dims["out"] % 4 == 0, "2 x 2 output patches (out channels divisible by 4)")
    out.update(patch_size=2, in_channels=dims["in"], out_channels=dims["out"] // 4,
               guidance_embeds=False)
  return out


# ---------------------------------------------------------------------------------------------
# reading safetensors


def _header(file):
  """The JSON header of a safetensors file ({key: {dtype, shape, data_offsets}}) and the byte
  offset of its data; a one-line UserError for a file that is not one or is cut short."""
  try:
    size = os.path.getsize(file)
    with open(file, "rb") as f:
      head = f.read(8)
      if len(head) < 8:
        raise ValueError(f"{size} bytes, shorter than a safetensors header")
      n = struct.unpack("<Q", head)[0]
      if n > size - 8:
        raise ValueError(f"the header length {n} is more than the file's {size} bytes")
      header = json.loads(f.read(n))
    if not isinstance(header, dict):
      raise ValueError(f"the header is a JSON {type(header).__name__}, not an object")
    header.pop("__metadata__", None)
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
  except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError) as e:
    raise UserError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
  if 8 + n + end > size:
    raise UserError(f"{file} is truncated: its header declares {end} bytes of tensors but the "
                    f"file holds {size - 8 - n}: download it again")
  return header, 8 + n


class _Checkpoint:
  """The tensors of a checkpoint (a diffusers directory or one .safetensors file), read one at
  a time as float32 numpy; the BFL prefix "model.diffusion_model." stripped."""

  def __init__(self, path):
    path = os.fspath(path)
    self.path, self.config, self.headers, self.handles = path, None, {}, {}
    if os.path.isdir(path):
      if os.path.isfile(os.path.join(path, "config.json")):
        self.config, _ = _read_config(path)
      index, single = os.path.join(path, INDEX), os.path.join(path, WEIGHTS)
      if os.path.isfile(index):
        try:
          with open(index) as f:
            files = {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
        except (OSError, ValueError, KeyError, AttributeError) as e:
          raise UserError(f"{index} is not a readable index ({type(e).__name__}: {e})") from None
        for file in sorted(set(files.values())):
          if not os.path.isfile(file):
            raise UserError(f"{path}: shard {os.path.basename(file)} (listed in {INDEX}) is missing")
      elif os.path.isfile(single):
        files = {k: single for k in self._header(single)[0]}
      elif pickled_files(path):
        raise not_safetensors(os.path.join(path, pickled_files(path)[0]), "MMDiT checkpoint")
      else:
        raise UserError(f"{path}: no {WEIGHTS} or {INDEX}: a diffusers transformer directory holds "
                        "config.json and safetensors weights")
    elif not os.path.exists(path):
      raise UserError(f"MMDiT checkpoint {path} does not exist: give a diffusers transformer "
                      "directory or a .safetensors file")
    elif os.path.isfile(path) and path.endswith(".safetensors"):
      files = {k: path for k in self._header(path)[0]}
    elif os.path.isfile(path):
      raise not_safetensors(path, "MMDiT checkpoint")
    else:
      raise UserError(f"MMDiT checkpoint {path} is neither a diffusers directory nor a "
                      ".safetensors file")
    for key, file in files.items():
      if key not in self._header(file)[0]:
        raise UserError(f"{path}: {os.path.basename(file)} lacks {key} (listed in {INDEX})")
    self.entries = {k: (f, k) for k, f in files.items()}  # our key -> (file, key in the file)
    if any(k.startswith(BFL_PREFIX) for k in files):
      self.entries = {k[len(BFL_PREFIX):]: (f, k) for k, f in files.items()
                      if k.startswith(BFL_PREFIX)}
    self.variant, self.layout = self._detect()

  def _header(self, file):
    if file not in self.headers:
      self.headers[file] = _header(file)
    return self.headers[file]

  def _detect(self):
    keys = self.entries
    if "double_blocks.0.img_attn.qkv.weight" in keys:
      found = ("flux", "bfl")
    elif "x_embedder.weight" in keys:
      found = ("flux", "diffusers")
    elif "pos_embed.proj.weight" in keys:
      found = ("sd3", "diffusers")
    elif "img_in.weight" in keys and "txt_norm.weight" in keys:
      found = ("qwen", "diffusers")
    else:
      raise UserError(f"{self.path}: not an MMDiT checkpoint (none of x_embedder.weight, "
                      "pos_embed.proj.weight, img_in.weight + txt_norm.weight, "
                      "double_blocks.0.img_attn.qkv.weight)")
    if self.config is not None:
      cls = self.config.get("_class_name")
      if cls not in CLASSES:
        raise UserError(f"{self.path}: _class_name {cls!r} is not an MMDiT this loader knows: use a "
                        f"{', '.join(CLASSES)} checkpoint")
      if CLASSES[cls] != found[0]:
        raise UserError(f"{self.path}: config.json says {cls} but the weights are a "
                        f"{CLASS_OF[found[0]]}'s")
    if any(".attn2." in k for k in keys):
      raise UserError(f"{self.path}: the checkpoint has dual attention (attn2: MMDiT-X, SD3.5-Medium), "
                      "which is not supported")
    return found

  def keys(self):
    return self.entries.keys()

  def shape(self, key):
    file, name = self.entries[key]
    return tuple(self.headers[file][0][name]["shape"])

  def get(self, key):
    file, name = self.entries[key]
    header, start = self.headers[file]
    info = header[name]
    try:
      if info["dtype"] == "BF16":  # numpy has no bfloat16: the high half of a float32
        begin, end = info["data_offsets"]
        raw = np.fromfile(file, dtype="<u2", count=(end - begin) // 2, offset=start + begin)
        return (raw.astype(np.uint32) << 16).view(np.float32).reshape(info["shape"])
      if file not in self.handles:
        from safetensors import safe_open
        self.handles[file] = safe_open(file, framework="np")
      return np.asarray(self.handles[file].get_tensor(name), dtype=np.float32)
    except Exception as e:  # noqa: BLE001 - any unreadable tensor is the user's to fix
      raise UserError(f"{file}: cannot read {name} ({type(e).__name__}: {e})") from None


# ---------------------------------------------------------------------------------------------
# the parameter mapping


class _Source:
  """Where one of our parameters lives in a checkpoint: tensor `key` (its slice [start, stop)
  along `dim`, or all of it), converted by `kind`, then permuted by `perm` along `axis`
  (ours = converted.take(perm, axis))."""

  def __init__(self, key, kind, dim=None, start=None, stop=None, axis=None, perm=None):
    self.key, self.kind, self.dim, self.start, self.stop = key, kind, dim, start, stop
    self.axis, self.perm = axis, perm


def _torch_shape(kind, shape):
  if kind == "linear":
    return (shape[1], shape[0])
  if kind == "q":  # [W, H, Dh] <- [H*Dh, W]
    return (shape[1] * shape[2], shape[0])
  if kind == "o":  # [H, Dh, W] <- [W, H*Dh]
    return (shape[2], shape[0] * shape[1])
  if kind == "hbias":  # [H, Dh] <- [H*Dh]
    return (shape[0] * shape[1],)
  if kind == "conv":  # [p*p*C, W] in (ph, pw, c) order <- [W, C, p, p]
    return (shape[1], shape[0] // SD3_PATCH ** 2, SD3_PATCH, SD3_PATCH)
  return tuple(shape)


def _to_ours(kind, array, shape):
  if kind in ("linear", "q", "o"):
    return array.T.reshape(shape)
  if kind == "conv":
    return array.transpose(2, 3, 1, 0).reshape(shape)
  return array.reshape(shape)


def _to_torch(kind, array):
  if kind == "linear":
    return array.T
  if kind == "q":
    return array.reshape(array.shape[0], -1).T
  if kind == "o":
    return array.reshape(-1, array.shape[-1]).T
  if kind == "hbias":
    return array.reshape(-1)
  if kind == "conv":
    c = array.shape[0] // SD3_PATCH ** 2
    return array.reshape(SD3_PATCH, SD3_PATCH, c, -1).transpose(3, 2, 0, 1)
  return array


def _chw_index(n, groups=1, p=2):
  """For n = groups x (p, p, c) entries: the (c, ph, pw) index of each (ph, pw, c) index."""
  g = n // groups
  c = g // (p * p)
  ph, pw, ch = np.meshgrid(np.arange(p), np.arange(p), np.arange(c), indexing="ij")
  within = (ch * p * p + ph * p + pw).reshape(-1)
  return np.concatenate([k * g + within for k in range(groups)])


def _patch_perms(variant, n_in, n_out, patch_order):
  """(img_in row permutation, proj_out column permutation) from the checkpoint's order to
  `patch_order` (None: none needed)."""
  native = "hwc" if variant == "sd3" else "chw"
  if patch_order == native:
    return None, None
  groups = n_in // n_out if n_out and n_in % n_out == 0 else 1
  for n, k, what in ((n_in, groups, "input"), (n_out, 1, "output")):
    if n % (4 * k):
      raise UserError(f"patch_order='{patch_order}': the {what} width {n} is not {k} packed 2 x 2 "
                      "latent patch(es); load with patch_order='chw'")
  p_in, p_out = _chw_index(n_in, groups), _chw_index(n_out)
  if native == "hwc":  # sd3 to (c, ph, pw): the inverse
    p_in, p_out = np.argsort(p_in), np.argsort(p_out)
  return p_in, p_out


def _pair(ours, names):
  """kernel / bias of a linear: {ours.kernel: (names .weight), ours.bias: (names .bias)}."""
  leaf = lambda n, suffix: None if n is None else f"{n}.{suffix}"
  return {f"{ours}.kernel": tuple(leaf(n, "weight") for n in names),
          f"{ours}.bias": tuple(leaf(n, "bias") for n in names)}


# Our parameter -> its tensor in (diffusers FLUX, diffusers SD3, diffusers Qwen-Image, BFL FLUX);
# None: none there. A tuple (name, dim, part) is part `part` of that tensor cut along `dim`: rows
# [q, k, v, mlp] of sizes (W, W, W, mlp width) or columns [attention, MLP] of sizes (W, mlp width).
_TOP = {
    **_pair("img_in", ("x_embedder", "pos_embed.proj", "img_in", "img_in")),
    "txt_norm.scale": (None, None, "txt_norm.weight", None),
    **_pair("txt_in", ("context_embedder", "context_embedder", "txt_in", "txt_in")),
    **_pair("time_in.linear_1",
            ("time_text_embed.timestep_embedder.linear_1",) * 3 + ("time_in.in_layer",)),
    **_pair("time_in.linear_2",
            ("time_text_embed.timestep_embedder.linear_2",) * 3 + ("time_in.out_layer",)),
    **_pair("guidance_in.linear_1",
            ("time_text_embed.guidance_embedder.linear_1", None, None, "guidance_in.in_layer")),
    **_pair("guidance_in.linear_2",
            ("time_text_embed.guidance_embedder.linear_2", None, None, "guidance_in.out_layer")),
    **_pair("vector_in.linear_1",
            ("time_text_embed.text_embedder.linear_1",) * 2 + (None, "vector_in.in_layer")),
    **_pair("vector_in.linear_2",
            ("time_text_embed.text_embedder.linear_2",) * 2 + (None, "vector_in.out_layer")),
    **_pair("final_mod", ("norm_out.linear",) * 3 + ("final_layer.adaLN_modulation.1",)),
    **_pair("proj_out", ("proj_out",) * 3 + ("final_layer.linear",)),
}

# ... within double block i (diffusers transformer_blocks.i, BFL double_blocks.i)
_DOUBLE = {
    **_pair("img_mod", ("norm1.linear",) * 2 + ("img_mod.1", "img_mod.lin")),
    **_pair("txt_mod", ("norm1_context.linear",) * 2 + ("txt_mod.1", "txt_mod.lin")),
}
for _s, _proj, _norm, _out in (("img", "to_{}", "norm_{}", "to_out.0"),
                               ("txt", "add_{}_proj", "norm_added_{}", "to_add_out")):
  for _j, _x in enumerate("qkv"):
    for _w, _suffix in (("w", "weight"), ("b", "bias")):
      _DOUBLE[f"{_s}_attn.{_w}{_x}"] = (f"attn.{_proj.format(_x)}.{_suffix}",) * 3 + (
          (f"{_s}_attn.qkv.{_suffix}", 0, _j),)
  for _x, _bfl in (("q", "query"), ("k", "key")):
    _DOUBLE[f"{_s}_attn.{_x}_norm.scale"] = (f"attn.{_norm.format(_x)}.weight",) * 3 + (
        f"{_s}_attn.norm.{_bfl}_norm.scale",)
  _DOUBLE[f"{_s}_attn.wo"] = (f"attn.{_out}.weight",) * 3 + (f"{_s}_attn.proj.weight",)
  _DOUBLE[f"{_s}_attn.bo"] = (f"attn.{_out}.bias",) * 3 + (f"{_s}_attn.proj.bias",)
  _ff = {"img": "ff", "txt": "ff_context"}[_s]
  for _ours, _net, _bfl in (("in", "net.0.proj", "0"), ("out", "net.2", "2")):
    for _w, _suffix in (("w", "weight"), ("b", "bias")):
      _DOUBLE[f"{_s}_mlp.{_w}_{_ours}"] = (f"{_ff}.{_net}.{_suffix}",) * 2 + (
          f"{_s}_mlp.{_net}.{_suffix}", f"{_s}_mlp.{_bfl}.{_suffix}")

# ... within single block i (diffusers single_transformer_blocks.i, BFL single_blocks.i)
_SINGLE = {
    **_pair("mod", ("norm.linear",) * 3 + ("modulation.lin",)),
    "mlp_in": ("proj_mlp.weight",) * 3 + (("linear1.weight", 0, 3),),
    "mlp_in_bias": ("proj_mlp.bias",) * 3 + (("linear1.bias", 0, 3),),
    "attn_out": (("proj_out.weight", 1, 0),) * 3 + (("linear2.weight", 1, 0),),
    "mlp_out": (("proj_out.weight", 1, 1),) * 3 + (("linear2.weight", 1, 1),),
    "out_bias": ("proj_out.bias",) * 3 + ("linear2.bias",),
}
for _j, _x in enumerate("qkv"):
  for _w, _suffix in (("w", "weight"), ("b", "bias")):
    _SINGLE[f"attn.{_w}{_x}"] = (f"attn.to_{_x}.{_suffix}",) * 3 + ((f"linear1.{_suffix}", 0, _j),)
for _x, _bfl in (("q", "query"), ("k", "key")):
  _SINGLE[f"attn.{_x}_norm.scale"] = (f"attn.norm_{_x}.weight",) * 3 + (f"norm.{_bfl}_norm.scale",)

_COLUMN = {"flux": 0, "sd3": 1, "qwen": 2}
_BLOCK = re.compile(r"^(double_blocks|single_blocks)\.(\d+)\.(.+)$")
_PREFIX = {"double_blocks": ("transformer_blocks", "double_blocks"),
           "single_blocks": ("single_transformer_blocks", "single_blocks")}


def _kind(path, name):
  leaf = path.split(".")[-1]
  if name.startswith("pos_embed.proj.weight"):
    return "conv"
  if leaf in ("wq", "wk", "wv"):
    return "q"
  if leaf in ("bq", "bk", "bv"):
    return "hbias"
  if leaf in ("wo", "attn_out"):
    return "o"
  if leaf in ("kernel", "w_in", "w_out", "mlp_in", "mlp_out"):
    return "linear"
  return "copy"


def _source(path, ctx):
  """The `_Source` of our parameter `path` (dotted) in the checkpoint `ctx` describes."""
  variant, bfl, w = ctx["variant"], ctx["layout"] == "bfl", ctx["width"]
  column = 3 if bfl else _COLUMN[variant]
  m = _BLOCK.match(path)
  table, prefix, rest = _TOP, "", path
  if m is not None:
    table, prefix, rest = (_DOUBLE if m[1] == "double_blocks" else _SINGLE,
                           f"{_PREFIX[m[1]][bfl]}.{m[2]}.", m[3])
  name = table.get(rest, (None,) * 4)[column]
  if name is None:
    raise UserError(f"the model's parameter {path} has no counterpart in a "
                    f"{'BFL FLUX' if bfl else CLASS_OF[variant]} checkpoint: set the model fields "
                    "from the checkpoint (model_fields)")
  key = prefix + (name if isinstance(name, str) else name[0])
  src = _Source(key, _kind(path, key))
  if not isinstance(name, str):  # a part of a tensor: q, k, v (, mlp) rows or attention / MLP columns
    _, src.dim, part = name
    sizes = (w, ctx["mlp"]) if src.dim == 1 else (w, w, w, ctx["mlp"])
    src.start, src.stop = sum(sizes[:part]), sum(sizes[:part + 1])
  if path == "img_in.kernel" and ctx["in_perm"] is not None:
    src.axis, src.perm = 0, ctx["in_perm"]
  if path.startswith("proj_out.") and ctx["out_perm"] is not None:
    src.axis, src.perm = (1 if path.endswith("kernel") else 0), ctx["out_perm"]
  if path.startswith("final_mod.") and bfl:  # BFL (shift, scale) -> ours (scale, shift)
    src.axis = 1 if path.endswith("kernel") else 0
    src.perm = np.concatenate([np.arange(w, 2 * w), np.arange(w)])
  return src


def _value(var):
  return var.get_value() if hasattr(var, "get_value") else var.value


def _flat(state):
  """[(dotted path, path, Variable)] of an nnx State of Params."""
  return [(".".join(str(p) for p in path), path, var) for path, var in nnx.to_flat_state(state)]


def _dims(flat):
  """Widths read off the parameter shapes: width, mlp, in, out."""
  shapes = {k: tuple(_value(v).shape) for k, _, v in flat}
  try:
    mlp = shapes.get("double_blocks.0.img_mlp.w_in") or shapes["single_blocks.0.mlp_in"]
    return {"width": shapes["img_in.kernel"][1], "mlp": mlp[1], "in": shapes["img_in.kernel"][0],
            "out": shapes["proj_out.kernel"][1], "context": shapes["txt_in.kernel"][0]}
  except KeyError as e:
    raise UserError(f"not the parameters of an MMDiT (no {e})") from None


def _sources(flat, variant, layout, patch_order):
  """(widths, {dotted path: _Source}) of our parameters in a checkpoint of variant / layout."""
  dims = _dims(flat)
  in_perm, out_perm = _patch_perms(variant, dims["in"], dims["out"], patch_order)
  ctx = dict(variant=variant, layout=layout, width=dims["width"], mlp=dims["mlp"],
             in_perm=in_perm, out_perm=out_perm)
  return dims, {dotted: _source(dotted, ctx) for dotted, _, _ in flat}


def _full_shapes(flat, sources):
  """{checkpoint key: its full torch shape}, in the order of first use."""
  out = {}
  for dotted, _, var in flat:
    src = sources[dotted]
    piece = list(_torch_shape(src.kind, tuple(_value(var).shape)))
    if src.dim is not None:
      prev = out.get(src.key)
      piece[src.dim] = max(src.stop, prev[src.dim] if prev else 0)
    out[src.key] = tuple(piece)
  return out


# ---------------------------------------------------------------------------------------------
# load / export


def load(path, model_or_state, variant=None, patch_order="hwc"):
  """Reads an MMDiT checkpoint (see the module docstring) into the parameters of
  `model_or_state` (an `MMDiT`, concrete or from nnx.eval_shape, or an nnx.State of its
  Params); returns a new nnx.State of Params (in the parameters' dtypes). A module is also
  updated in place. variant: the expected variant ("flux", "sd3", "qwen"; a
  module's own by default): a checkpoint of another is a UserError. patch_order: the patch
  vectors the loaded model takes and gives, "hwc" (ours, default) or "chw" (diffusers' packing)."""
  if patch_order not in PATCH_ORDERS:
    raise UserError(f"patch_order={patch_order!r}: use one of {', '.join(PATCH_ORDERS)}")
  module = model_or_state if isinstance(model_or_state, MMDiT) else None
  state = nnx.state(module, nnx.Param) if module is not None else model_or_state
  want = variant or (module.variant if module is not None else None)
  if module is not None and variant and variant != module.variant:
    raise UserError(f"variant='{variant}' but the model is an MMDiT of variant '{module.variant}'")
  ckpt = _Checkpoint(path)
  if want and want != ckpt.variant:
    raise UserError(f"{path} holds a {CLASS_OF[ckpt.variant]} ({ckpt.variant}) checkpoint but the model "
                    f"is model.mmdit.variant='{want}': set the model fields from the checkpoint")
  if module is not None and ckpt.config is not None:
    fields = model_fields(ckpt.config)["mmdit"]
    if ckpt.variant != "sd3" and tuple(fields["axes_dims"]) != module.axes_dims:
      raise UserError(f"{path}: axes_dims_rope={list(fields['axes_dims'])} but the model has "
                      f"model.mmdit.axes_dims={module.axes_dims}")
    if ckpt.variant == "sd3" and fields["pos_embed_max_size"] != module.pos_embed_max_size:
      raise UserError(f"{path}: pos_embed_max_size={fields['pos_embed_max_size']} but the model has "
                      f"model.mmdit.pos_embed_max_size={module.pos_embed_max_size}")
  flat = _flat(state)
  _, sources = _sources(flat, ckpt.variant, ckpt.layout, patch_order)
  users = {}
  for dotted, path_, var in flat:
    users.setdefault(sources[dotted].key, []).append((dotted, path_, var))
  for key, want_shape in _full_shapes(flat, sources).items():
    if key not in ckpt.keys():
      raise UserError(f"{path}: no tensor {key} (for the model's {users[key][0][0]}); set the model "
                      "fields from the checkpoint (model_fields)")
    have = ckpt.shape(key)
    if have != want_shape:
      raise UserError(f"{path}: tensor {key} has shape {have} but the model ({users[key][0][0]}) "
                      f"needs {want_shape}: set the model fields from the checkpoint (model_fields)")
  extra = [k for k in ckpt.keys() if k not in users and k not in _IGNORED]
  if extra:
    raise UserError(f"{path}: tensor {extra[0]} has no parameter in the model ({len(extra)} unused): "
                    "set the model fields from the checkpoint (model_fields)")
  out = []
  for key, params in users.items():  # each tensor read once
    tensor = ckpt.get(key)
    for dotted, path_, var in params:
      src, value = sources[dotted], _value(var)
      array = tensor
      if src.dim is not None:
        array = np.take(array, np.arange(src.start, src.stop), axis=src.dim)
      array = _to_ours(src.kind, array, tuple(value.shape))
      if src.perm is not None:
        array = np.take(array, src.perm, axis=src.axis)
      out.append((path_, var.replace(jnp.asarray(array, dtype=value.dtype))))
  order = {path_: i for i, (_, path_, _) in enumerate(flat)}
  new = nnx.from_flat_state(sorted(out, key=lambda kv: order[kv[0]]))
  if module is not None:
    nnx.update(module, new)
  return new


def export(model_state, cfg, out_dir, max_shard_bytes=10 ** 10, patch_order="hwc"):
  """Writes `out_dir`/config.json and the weights (float32; one diffusion_pytorch_model.safetensors,
  or shards of at most max_shard_bytes and an index) of the MMDiT whose Params are `model_state`
  (an nnx.State, or the module) and whose model config is `cfg` (the model section or a whole
  config), so that diffusers' FluxTransformer2DModel / SD3Transformer2DModel /
  QwenImageTransformer2DModel.from_pretrained(out_dir) loads it. patch_order: the model's
  patch vector order ("hwc" ours, "chw" diffusers' packing), as it was loaded."""
  from safetensors.numpy import save_file
  if patch_order not in PATCH_ORDERS:
    raise UserError(f"patch_order={patch_order!r}: use one of {', '.join(PATCH_ORDERS)}")
  cfg = cfg.model if "model" in cfg else cfg
  state = nnx.state(model_state, nnx.Param) if isinstance(model_state, nnx.Module) else model_state
  flat = _flat(state)
  variant = cfg.mmdit.variant
  dims, sources = _sources(flat, variant, "diffusers", patch_order)
  config = _diffusers_config(cfg, dims)
  users = {}
  for dotted, _, var in flat:
    users.setdefault(sources[dotted].key, []).append((sources[dotted], var))
  shapes = _full_shapes(flat, sources)
  if variant == "sd3":  # diffusers' persistent buffer
    shapes["pos_embed.pos_embed"] = (1, int(cfg.mmdit.pos_embed_max_size) ** 2, dims["width"])

  def tensor(key):  # assembled from its parameters
    if key == "pos_embed.pos_embed":
      return sd3_table(dims["width"], int(cfg.mmdit.pos_embed_max_size))[None]
    out = np.zeros(shapes[key], np.float32)
    for src, var in users[key]:
      array = np.asarray(_value(var), np.float32)
      if src.perm is not None:
        array = np.take(array, np.argsort(src.perm), axis=src.axis)
      index = [slice(None)] * out.ndim
      if src.dim is not None:
        index[src.dim] = slice(src.start, src.stop)
      out[tuple(index)] = _to_torch(src.kind, array)
    return out

  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  nbytes = {key: 4 * math.prod(shape) for key, shape in shapes.items()}
  shards, size = [[]], 0
  for key in shapes:  # one shard in memory at a time
    if shards[-1] and size + nbytes[key] > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(key)
    size += nbytes[key]
  if len(shards) == 1:
    save_file({key: tensor(key) for key in shards[0]}, os.path.join(out_dir, WEIGHTS))
    return
  weight_map = {}
  for i, keys in enumerate(shards):
    name = f"diffusion_pytorch_model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file({key: tensor(key) for key in keys}, os.path.join(out_dir, name))
    weight_map.update({key: name for key in keys})
  with open(os.path.join(out_dir, INDEX), "w") as f:
    json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, f,
              indent=2)
