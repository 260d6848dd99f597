"""diffusers `AutoencoderKL` weights <-> `unimm.models.vae.AutoencoderKL`.

The only place that knows diffusers' and the original LDM/SD checkpoint layouts.
Our parameter paths are diffusers' key names with `kernel`/`scale` for
`weight`; kernels are transposed (conv OIHW <-> HWIO, linear (out, in) <-> (in, out)).
"""

import dataclasses
import json
import os
import re

import numpy as np
from flax import nnx

from unimm.errors import UserError, read_json
from unimm.interop import not_safetensors, pickled_files
from unimm.models.vae import FAMILIES, AutoencoderKL, VAEConfig, family_config

WEIGHTS = "diffusion_pytorch_model.safetensors"
LDM_PREFIXES = ("first_stage_model.", "vae.")
# Pre-0.14 diffusers attention names, still found in some diffusers-layout checkpoints.
_OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _named(state):
  """{diffusers key: Param variable} for every parameter in an nnx Param state."""
  out = {}
  for path, var in nnx.to_flat_state(state):
    *head, leaf = (str(p) for p in path)
    out[".".join(head + [{"kernel": "weight", "scale": "weight"}.get(leaf, leaf)])] = var
  return out


def _to_torch_shape(shape):
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


def _from_torch(array, ndim):
  """A torch-layout tensor in our layout: OIHW -> HWIO, (out, in) -> (in, out)."""
  if ndim == 2 and array.ndim in (3, 4):  # attention stored as a 1x1 conv (old checkpoints)
    array = array.reshape(array.shape[:2])
  if ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if ndim == 2:
    return np.transpose(array)
  return array


def _to_torch(array):
  if array.ndim == 4:
    return np.ascontiguousarray(np.transpose(array, (3, 2, 0, 1)))
  if array.ndim == 2:
    return np.ascontiguousarray(np.transpose(array))
  return np.ascontiguousarray(array)


def _read_safetensors(path):
  from safetensors.numpy import load_file
  try:
    return load_file(path)
  except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
    raise UserError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


def _config_from_diffusers(cfg, path):
  for field in ("down_block_types", "up_block_types"):
    kinds = set(cfg.get(field) or ())
    want = "DownEncoderBlock2D" if field.startswith("down") else "UpDecoderBlock2D"
    if kinds - {want}:
      raise UserError(f"{path}: {field} {sorted(kinds)} is not supported; only {want} is")
  if cfg.get("act_fn", "silu") != "silu" or not cfg.get("mid_block_add_attention", True):
    raise UserError(f"{path}: only act_fn='silu' with mid-block attention is supported")
  if cfg.get("latents_mean") is not None:
    raise UserError(f"{path}: per-channel latents_mean/latents_std normalisation is not supported")
  shift = cfg.get("shift_factor")
  return VAEConfig(
      block_out_channels=tuple(cfg.get("block_out_channels", (64,))),
      layers_per_block=cfg.get("layers_per_block", 1),
      latent_channels=cfg.get("latent_channels", 4),
      in_channels=cfg.get("in_channels", 3),
      out_channels=cfg.get("out_channels", 3),
      norm_num_groups=cfg.get("norm_num_groups", 32),
      use_quant_conv=cfg.get("use_quant_conv", True),
      use_post_quant_conv=cfg.get("use_post_quant_conv", True),
      scaling_factor=cfg.get("scaling_factor", 0.18215),
      shift_factor=0.0 if shift is None else shift)


def ldm_key(name, num_blocks):
  """diffusers VAE key -> original LDM/SD key (inverse of diffusers' convert_ldm_vae_checkpoint)."""
  name = re.sub(r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out.", name)
  name = re.sub(r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", name)
  name = re.sub(r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", name)
  name = re.sub(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.",
                lambda m: f"decoder.up.{num_blocks - 1 - int(m[1])}."
                f"{'block' if m[2] == 'resnets' else 'upsample'}.", name)
  name = re.sub(r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", name)
  name = name.replace(".mid_block.attentions.0.", ".mid.attn_1.")
  name = name.replace(".conv_shortcut.", ".nin_shortcut.").replace(".group_norm.", ".norm.")
  name = re.sub(r"\.to_(q|k|v)\.", r".\1.", name).replace(".to_out.0.", ".proj_out.")
  return name


def _strip_ldm_prefix(tensors):
  for prefix in LDM_PREFIXES:
    if any(k.startswith(prefix + "encoder.") for k in tensors):
      return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  return tensors


def _infer_ldm_config(t, path, family):
  """VAEConfig from the tensor shapes of an LDM-layout VAE; scale/shift from `family`."""
  try:
    blocks = sorted({int(m[1]) for k in t for m in [re.match(r"encoder\.down\.(\d+)\.", k)] if m})
    layers = len({m[1] for k in t for m in [re.match(r"encoder\.down\.0\.block\.(\d+)\.", k)] if m})
    channels = tuple(int(t[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in blocks)
    latent = int(t["decoder.conv_in.weight"].shape[1])
    in_ch = int(t["encoder.conv_in.weight"].shape[1])
    out_ch = int(t["decoder.conv_out.weight"].shape[0])
  except KeyError as e:
    raise UserError(f"{path}: not an AutoencoderKL checkpoint: no tensor {e} "
                    f"(looked for LDM names 'encoder.down.0.block.0...', optional prefix "
                    f"{' or '.join(LDM_PREFIXES)})") from None
  if family is None:
    if latent != 4:
      raise UserError(f"{path}: a {latent}-channel VAE; pass family= one of "
                      f"{', '.join(k for k, v in FAMILIES.items() if v['latent_channels'] == latent)} "
                      "(or config=) to set its latent scale and shift")
    family = "sd"  # diffusers' default for LDM VAEs
  return family_config(family, block_out_channels=channels, layers_per_block=layers,
                       latent_channels=latent, in_channels=in_ch, out_channels=out_ch,
                       use_quant_conv="quant_conv.weight" in t,
                       use_post_quant_conv="post_quant_conv.weight" in t)


def load_diffusers_vae(path, config=None, family=None):
  """Loads a KL VAE -> (model, config).

  `path`: a diffusers directory (`config.json` + `diffusion_pytorch_model.safetensors`)
  or one original-layout `.safetensors` (LDM key names, with or without the
  `first_stage_model.` prefix). `config` (VAEConfig) overrides what the files say;
  for a single file without it, the architecture is read from tensor shapes and
  the scale/shift from `family` (default 'sd' for 4-channel latents).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise UserError(f"vae checkpoint {path} does not exist")
  if os.path.isdir(path):
    cfg_file, weights = os.path.join(path, "config.json"), os.path.join(path, WEIGHTS)
    if not os.path.isfile(weights) and pickled_files(path):
      raise not_safetensors(os.path.join(path, pickled_files(path)[0]), "vae checkpoint")
    for f in (cfg_file, weights):
      if not os.path.isfile(f):
        raise UserError(f"{path}: no {os.path.basename(f)}; a diffusers AutoencoderKL directory "
                        f"holds config.json and {WEIGHTS}")
    if config is None:
      hf = read_json(cfg_file, "download it again", "a diffusers config")
      config = _config_from_diffusers(hf, path)
      if family is not None:
        preset = family_config(family)
        config = dataclasses.replace(config, scaling_factor=preset.scaling_factor,
                                     shift_factor=preset.shift_factor)
    tensors = {}
    for k, v in _read_safetensors(weights).items():
      parts = k.split(".")
      if len(parts) > 1 and parts[-2] in _OLD_ATTENTION:
        k = ".".join(parts[:-2] + [_OLD_ATTENTION[parts[-2]], parts[-1]])
      tensors[k] = v
    rename, source = (lambda name: name), weights
  elif not path.endswith(".safetensors"):
    raise not_safetensors(path, "vae checkpoint")
  else:
    tensors = _strip_ldm_prefix(_read_safetensors(path))
    if config is None:
      config = _infer_ldm_config(tensors, path, family)
    n = len(config.block_out_channels)
    rename, source = (lambda name: ldm_key(name, n)), path

  model = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
  state = nnx.state(model, nnx.Param)
  used = set()
  for name, var in _named(state).items():
    key = rename(name)
    if key not in tensors:
      also = "" if key == name else f" (diffusers name {name})"
      raise UserError(f"{source}: no tensor '{key}'{also}; is this an "
                      f"AutoencoderKL checkpoint of block_out_channels={config.block_out_channels}, "
                      f"layers_per_block={config.layers_per_block}?")
    array = np.asarray(tensors[key])
    want = _to_torch_shape(var.shape)
    got = array.shape
    if len(want) == 2 and array.ndim > 2 and set(array.shape[2:]) == {1}:
      got = array.shape[:2]  # attention stored as a 1x1 conv
    if tuple(got) != tuple(want):
      also = "" if key == name else f" (diffusers name {name})"
      raise UserError(f"{source}: tensor '{key}' has shape {tuple(array.shape)} but the config "
                      f"expects {tuple(want)}{also}")
    var.set_value(np.asarray(_from_torch(array.astype(np.float32), len(var.shape))))
    used.add(key)
  extra = sorted(k for k in tensors if k not in used and k.startswith(("encoder.", "decoder.")))
  if extra:
    raise UserError(f"{source}: tensor '{extra[0]}' has no parameter in a VAE of "
                    f"block_out_channels={config.block_out_channels}, "
                    f"layers_per_block={config.layers_per_block} ({len(extra)} unused)")
  nnx.update(model, state)
  return model, config


def export_diffusers_vae(model, config, directory):
  """Writes `config.json` + `diffusion_pytorch_model.safetensors` that
  `diffusers.AutoencoderKL.from_pretrained(directory)` loads."""
  from safetensors.numpy import save_file
  os.makedirs(directory, exist_ok=True)
  n = len(config.block_out_channels)
  cfg = {
      "_class_name": "AutoencoderKL",
      "in_channels": config.in_channels,
      "out_channels": config.out_channels,
      "down_block_types": ["DownEncoderBlock2D"] * n,
      "up_block_types": ["UpDecoderBlock2D"] * n,
      "block_out_channels": list(config.block_out_channels),
      "layers_per_block": config.layers_per_block,
      "act_fn": "silu",
      "latent_channels": config.latent_channels,
      "norm_num_groups": config.norm_num_groups,
      "sample_size": 1024,
      "scaling_factor": config.scaling_factor,
      "shift_factor": config.shift_factor or None,
      "latents_mean": None,
      "latents_std": None,
      "force_upcast": True,
      "use_quant_conv": config.use_quant_conv,
      "use_post_quant_conv": config.use_post_quant_conv,
      "mid_block_add_attention": True,
  }
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(cfg, f, indent=2)
  tensors = {name: _to_torch(np.asarray(var.get_value(), np.float32))
             for name, var in _named(nnx.state(model, nnx.Param)).items()}
  save_file(tensors, os.path.join(directory, WEIGHTS))
