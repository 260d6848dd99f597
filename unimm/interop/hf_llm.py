"""Hugging Face causal LMs (Llama, Qwen2/2.5, Qwen3, Qwen3-MoE) <-> the unified transformer's text model.

The only place that knows the Hugging Face checkpoint layout of these families:

    model_fields(path)             config.json -> cfg.model field values
    apply_model_fields(cfg, path)  ... written into cfg.model (model.init_from does this)
    load_params(path, params, cfg) safetensors weights -> a new nnx.State of the model's Params
    export(params, cfg, path)      the text model (MoT expert 0) -> config.json + safetensors
    copy_tokenizer(src, dst)       the tokenizer files of a checkpoint directory

Layouts (HF torch Linear weights are [out, in]; ours are [in, ...]):

    model.embed_tokens.weight [V, D]          embed [V, D]
    lm_head.weight [V, D]                     lm_head [D, V] (none when tie_word_embeddings)
    model.norm.weight                         final_norm.scale
    model.layers.i.input_layernorm            blocks.i.attn_norm.scale
    .self_attn.q_proj.weight [H*Dh, D]        blocks.i.attn.wq [D, H, Dh]   (k, v: KV heads)
    .self_attn.q_proj.bias [H*Dh]             blocks.i.attn.bq [H, Dh]      (Qwen2)
    .self_attn.o_proj.weight [D, H*Dh]        blocks.i.attn.wo [H, Dh, D]
    .self_attn.q_norm.weight [Dh]             blocks.i.attn.q_norm.scale    (Qwen3)
    .post_attention_layernorm                 blocks.i.mlp_norm.scale
    .mlp.{gate,up}_proj.weight [F, D]         blocks.i.mlp.w_{gate,up} [D, F]
    .mlp.down_proj.weight [D, F]              blocks.i.mlp.w_down [F, D]
    .mlp.gate.weight [E, D]                   blocks.i.mlp.router [D, E]    (Qwen3-MoE)
    .mlp.experts.e.{gate,up}_proj.weight      blocks.i.mlp.w_{gate,up} [E, D, Fe]
    .mlp.experts.e.down_proj.weight [D, Fe]   blocks.i.mlp.w_down [E, Fe, D]

Qwen3-MoE experts are read in both layouts: per-expert keys (the hub checkpoints, and
what transformers 5.x `save_pretrained` writes) and the fused tensors transformers 5.x
holds in memory (`mlp.experts.gate_up_proj` [E, 2*Fe, D], gate rows first, and
`mlp.experts.down_proj` [E, D, Fe]; written by `save_pretrained(save_original_format=False)`).
Export writes per-expert keys.

Mixture-of-transformers experts (`blocks.i.modality_experts.j.*`) are not in the
checkpoint: they keep their init, or become copies of the text expert with
model.mot.init_copy. Image-side parameters (patch_in, patch_pos, modality_embed,
t_in, t_out, flow_head, vit.*) keep their init. Embedding rows beyond the
checkpoint's vocabulary (a model vocab grown for extra special tokens) keep their init.
"""

import json
import os
import re
import shutil

import numpy as np
from flax import nnx

from unimm.errors import UserError, read_json
from unimm.interop import not_safetensors

SUPPORTED = ("llama", "qwen2", "qwen3", "qwen3_moe")
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
SET_FIELDS = "set the model fields from the checkpoint (model.init_from does this)"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json")
_ARCH = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
         "qwen3_moe": "Qwen3MoeForCausalLM"}
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Checkpoint tensors that carry nothing the model needs.
_IGNORED = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


# ---------------------------------------------------------------------------------------------
# config.json <-> model fields


def _read_config(path):
  file = os.path.join(path, "config.json")
  if os.path.isfile(path) and not path.endswith(".safetensors"):
    raise not_safetensors(path, "Hugging Face checkpoint")
  if not os.path.isdir(path):
    raise UserError(f"Hugging Face checkpoint directory {path} does not exist: set model.init_from "
                    "to a local directory with config.json and *.safetensors")
  if not os.path.isfile(file):
    raise UserError(f"{path} has no config.json: point model.init_from at a Hugging Face model "
                    "directory (config.json + *.safetensors)")
  hf = read_json(file, "download the checkpoint again", "a model config")
  kind = hf.get("model_type")
  if kind not in SUPPORTED:
    raise UserError(f"{path}: model_type {kind!r} is not supported: use a Llama, Qwen2/2.5, Qwen3 "
                    "or Qwen3-MoE checkpoint")
  return hf


def _rope_theta(hf, path):
  """rope_theta of a plain (unscaled, full-head) RoPE; anything else is a UserError."""
  theta = hf.get("rope_theta")
  for key in ("rope_parameters", "rope_scaling"):
    spec = hf.get(key)
    if spec is None:
      continue
    if not isinstance(spec, dict):
      raise UserError(f"{path}: config.json {key}={spec!r} is not understood: use a checkpoint with "
                      "the default RoPE")
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind not in (None, "default"):
      raise UserError(f"{path}: RoPE scaling {kind!r} ({key}) is not supported, only the default "
                      "RoPE: use a checkpoint without rope scaling (rope_type 'default')")
    if float(spec.get("partial_rotary_factor", 1.0)) != 1.0:
      raise UserError(f"{path}: partial_rotary_factor={spec['partial_rotary_factor']} is not "
                      "supported (the model rotates whole heads): use a checkpoint with full RoPE")
    theta = spec.get("rope_theta", theta)
  if float(hf.get("partial_rotary_factor", 1.0)) != 1.0:
    raise UserError(f"{path}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported "
                    "(the model rotates whole heads): use a checkpoint with full RoPE")
  return 10_000.0 if theta is None else float(theta)


def model_fields(path) -> dict:
  """cfg.model field values of the Hugging Face checkpoint at `path` (its config.json)."""
  hf = _read_config(path)
  kind = hf["model_type"]

  def need(key):
    if hf.get(key) is None:
      raise UserError(f"{path}: config.json has no {key}: download the checkpoint's config.json again")
    return hf[key]

  width, depth, heads = int(need("hidden_size")), int(need("num_hidden_layers")), int(
      need("num_attention_heads"))
  if hf.get("hidden_act", "silu") != "silu":
    raise UserError(f"{path}: hidden_act={hf['hidden_act']!r} is not supported (the model's MLP is "
                    "SwiGLU with silu): use a checkpoint with hidden_act 'silu'")
  if kind in ("llama", "qwen3", "qwen3_moe") and hf.get("attention_bias"):
    raise UserError(f"{path}: attention_bias=true ({kind}) adds an output-projection bias the model "
                    "does not have: use a checkpoint with attention_bias false")
  if hf.get("mlp_bias"):
    raise UserError(f"{path}: mlp_bias=true is not supported: use a checkpoint without MLP biases")
  if hf.get("use_sliding_window"):
    raise UserError(f"{path}: use_sliding_window=true is not supported (the model attends over the "
                    "whole sequence): use a checkpoint with use_sliding_window false")
  layer_types = hf.get("layer_types") or ()
  if any(t != "full_attention" for t in layer_types):
    raise UserError(f"{path}: layer_types {sorted(set(layer_types))} are not supported, only "
                    "full_attention")
  head_dim = hf.get("head_dim")
  if head_dim is None:  # the families' config defaults
    head_dim = 128 if kind == "qwen3" else width // heads
  moe = dict(experts=0, top_k=2, expert_dim=0, renormalize=True, every=1, dense_layers=(),
             shared_experts=0, router="softmax")
  mlp_dim = int(need("intermediate_size"))
  if kind == "qwen3_moe":
    experts = hf.get("num_experts", hf.get("num_local_experts", 128))
    moe.update(experts=int(experts), top_k=int(hf.get("num_experts_per_tok", 8)),
               expert_dim=int(hf.get("moe_intermediate_size", 768)),
               renormalize=bool(hf.get("norm_topk_prob", False)),
               every=int(hf.get("decoder_sparse_step", 1)),
               dense_layers=tuple(int(i) for i in (hf.get("mlp_only_layers") or ())))
    if moe["experts"] <= 0:
      moe.update(experts=0)
  return dict(
      width=width, depth=depth, heads=heads,
      kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(head_dim), mlp_dim=mlp_dim, vocab_size=int(need("vocab_size")),
      rope_theta=_rope_theta(hf, path), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      qk_norm=kind in ("qwen3", "qwen3_moe"), qkv_bias=kind == "qwen2",
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)), moe=moe)


def apply_model_fields(cfg, path) -> dict:
  """Sets cfg.model's architecture fields from the checkpoint at `path`; returns them."""
  fields = model_fields(path)
  for key, value in fields.items():
    if key == "moe":
      for k, v in value.items():
        cfg.model.moe[k] = v
    else:
      cfg.model[key] = value
  return fields


# ---------------------------------------------------------------------------------------------
# reading safetensors


class _Checkpoint:
  """The tensors of a checkpoint directory, read one at a time (float32 numpy)."""

  def __init__(self, path):
    self.path, self._handles = path, {}
    index = os.path.join(path, INDEX)
    single = os.path.join(path, WEIGHTS)
    if os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)["weight_map"]
      except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{index} is not a readable index ({type(e).__name__}: {e}): download the "
                        "checkpoint again") from None
      for shard in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(path, shard)):
          raise UserError(f"checkpoint {path} is missing shard {shard} (listed in {INDEX}): download "
                          "it again / copy all shards")
      self.files = dict(weight_map)
    elif os.path.isfile(single):
      self.files = {k: WEIGHTS for k in self._open(WEIGHTS).keys()}
    else:
      names = os.listdir(path)
      if any(n.endswith(".bin") or n == "pytorch_model.bin.index.json" for n in names):
        raise UserError(f"checkpoint {path} has only PyTorch .bin weights: convert them to safetensors "
                        "(load with transformers and save_pretrained(dir, safe_serialization=True))")
      others = sorted(n for n in names if n.endswith(".safetensors"))
      raise UserError(f"checkpoint {path} has no {WEIGHTS} or {INDEX}"
                      + (f" (found {', '.join(others)})" if others else "")
                      + ": download the model's safetensors weights")

  def _open(self, name):
    handles = self._handles
    if name not in handles:
      from safetensors import safe_open
      try:
        handles[name] = safe_open(os.path.join(self.path, name), framework="np")
      except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"{os.path.join(self.path, name)}: not a readable safetensors file "
                        f"({type(e).__name__}: {e}): download it again") from None
    return handles[name]

  def __contains__(self, key):
    return key in self.files

  def keys(self):
    return self.files.keys()

  def shape(self, key):
    return tuple(self._open(self.files[key]).get_slice(key).get_shape())

  def get(self, key):
    handle = self._open(self.files[key])
    try:
      if key not in handle.keys():
        raise UserError(f"checkpoint {self.path}: {self.files[key]} lacks {key} (listed in {INDEX}): "
                        "download the checkpoint again")
      dtype = handle.get_slice(key).get_dtype()
      if dtype in ("BF16", "F8_E4M3", "F8_E5M2"):  # numpy has no such dtype: read through JAX on the CPU
        import jax
        from safetensors import safe_open
        with jax.default_device(jax.devices("cpu")[0]):
          array = safe_open(os.path.join(self.path, self.files[key]), framework="flax").get_tensor(key)
          return np.asarray(array.astype(np.float32))
      return np.asarray(handle.get_tensor(key), dtype=np.float32)
    except UserError:
      raise
    except Exception as e:  # noqa: BLE001
      raise UserError(f"checkpoint {self.path}: cannot read {key} from {self.files[key]} "
                      f"({type(e).__name__}: {e}): download it again") from None


# ---------------------------------------------------------------------------------------------
# the parameter mapping


def _ours_to_hf_shape(kind, shape):
  """HF tensor shape for one of our parameters of `shape` (see `_to_ours`)."""
  if kind == "linear":  # [in, out] <-> [out, in]
    return (shape[1], shape[0])
  if kind in ("q", "kv"):  # [D, H, Dh] <-> [H*Dh, D]
    return (shape[1] * shape[2], shape[0])
  if kind == "o":  # [H, Dh, D] <-> [D, H*Dh]
    return (shape[2], shape[0] * shape[1])
  if kind == "bias":  # [H, Dh] <-> [H*Dh]
    return (shape[0] * shape[1],)
  return tuple(shape)


def _to_ours(kind, array, shape):
  if kind == "linear":
    return np.ascontiguousarray(array.T)
  if kind in ("q", "kv", "o", "bias"):
    return np.ascontiguousarray(array.T.reshape(shape) if kind != "bias" else array.reshape(shape))
  return np.ascontiguousarray(array)


def _to_hf(kind, array):
  array = np.asarray(array, np.float32)
  if kind == "linear":
    return np.ascontiguousarray(array.T)
  if kind in ("q", "kv"):
    return np.ascontiguousarray(array.reshape(array.shape[0], -1).T)
  if kind == "o":
    return np.ascontiguousarray(array.reshape(-1, array.shape[-1]).T)
  if kind == "bias":
    return np.ascontiguousarray(array.reshape(-1))
  return np.ascontiguousarray(array)


# our name within a block -> (HF name within model.layers.i, conversion kind)
_BLOCK = {
    "attn_norm.scale": ("input_layernorm.weight", "copy"),
    "mlp_norm.scale": ("post_attention_layernorm.weight", "copy"),
    "attn.wq": ("self_attn.q_proj.weight", "q"),
    "attn.wk": ("self_attn.k_proj.weight", "kv"),
    "attn.wv": ("self_attn.v_proj.weight", "kv"),
    "attn.wo": ("self_attn.o_proj.weight", "o"),
    "attn.bq": ("self_attn.q_proj.bias", "bias"),
    "attn.bk": ("self_attn.k_proj.bias", "bias"),
    "attn.bv": ("self_attn.v_proj.bias", "bias"),
    "attn.q_norm.scale": ("self_attn.q_norm.weight", "copy"),
    "attn.k_norm.scale": ("self_attn.k_norm.weight", "copy"),
}
_DENSE = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_TOP = {"embed": ("model.embed_tokens.weight", "copy"), "lm_head": ("lm_head.weight", "linear"),
        "final_norm.scale": ("model.norm.weight", "copy")}
_BLOCK_PATH = re.compile(r"^blocks\.(\d+)\.(.+)$")
_MOT_PATH = re.compile(r"^modality_experts\.(\d+)\.(.+)$")


def _flat(params):
  """[(dotted path, Variable)] of an nnx State of Params."""
  return [(".".join(str(p) for p in path), var) for path, var in nnx.to_flat_state(params)]


def _value(var):
  return var.get_value() if hasattr(var, "get_value") else var.value


def _shape_mismatch(hf_key, hf_shape, ours, our_shape, want):
  return UserError(f"checkpoint tensor {hf_key} has shape {tuple(hf_shape)} but the model's {ours} "
                   f"{tuple(our_shape)} needs {tuple(want)}: {SET_FIELDS}")


class _Reader:
  """Converts checkpoint tensors to our parameters, remembering which tensors it used."""

  def __init__(self, ckpt):
    self.ckpt, self.used = ckpt, set()

  def tensor(self, key, ours):
    if key not in self.ckpt:
      raise UserError(f"checkpoint {self.ckpt.path} has no tensor {key} (for the model's {ours}): "
                      f"{SET_FIELDS}")
    self.used.add(key)
    return key

  def simple(self, key, kind, ours, shape, dtype, grow_rows=False):
    self.tensor(key, ours)
    have, want = self.ckpt.shape(key), _ours_to_hf_shape(kind, shape)
    if grow_rows and len(have) == 2 and have[1] == want[1] and have[0] < want[0]:
      return None, have[0]  # vocab rows beyond the checkpoint's keep their init
    if have != want:
      raise _shape_mismatch(key, have, ours, shape, want)
    return _to_ours(kind, self.ckpt.get(key), shape).astype(dtype, copy=False), None

  def experts(self, prefix, name, ours, shape, dtype):
    """MoE expert weights [E, D, Fe] / [E, Fe, D] from per-expert keys or fused tensors."""
    experts = shape[0]
    proj = _DENSE[name]
    per_expert = f"{prefix}mlp.experts.0.{proj}.weight"
    fused = f"{prefix}mlp.experts.{'down_proj' if name == 'w_down' else 'gate_up_proj'}"
    if per_expert in self.ckpt or fused not in self.ckpt:
      out = np.empty(shape, dtype)
      for e in range(experts):
        key = self.tensor(f"{prefix}mlp.experts.{e}.{proj}.weight", ours)
        have, want = self.ckpt.shape(key), (shape[2], shape[1])
        if have != want:
          raise _shape_mismatch(key, have, f"{ours}[{e}]", shape[1:], want)
        out[e] = self.ckpt.get(key).T
      extra = f"{prefix}mlp.experts.{experts}.{proj}.weight"
      if extra in self.ckpt:
        raise UserError(f"checkpoint tensor {extra} has no place in the model ({ours} has {experts} "
                        f"experts): {SET_FIELDS}")
      return out
    self.tensor(fused, ours)
    have = self.ckpt.shape(fused)
    if name == "w_down":  # [E, D, Fe]
      want = (experts, shape[2], shape[1])
      if have != want:
        raise _shape_mismatch(fused, have, ours, shape, want)
      return np.ascontiguousarray(self.ckpt.get(fused).transpose(0, 2, 1)).astype(dtype, copy=False)
    want = (experts, 2 * shape[2], shape[1])  # [E, 2*Fe, D], gate rows then up rows
    if have != want:
      raise _shape_mismatch(fused, have, ours, shape, want)
    w = self.ckpt.get(fused)
    half = w[:, :shape[2]] if name == "w_gate" else w[:, shape[2]:]
    return np.ascontiguousarray(half.transpose(0, 2, 1)).astype(dtype, copy=False)


def _block_param(reader, i, rest, ours, shape, dtype):
  """Our block-i parameter `rest` (e.g. 'attn.wq', 'mlp.w_gate') from the checkpoint."""
  prefix = f"model.layers.{i}."
  if rest in _BLOCK:
    name, kind = _BLOCK[rest]
    return reader.simple(prefix + name, kind, ours, shape, dtype)[0]
  parts = rest.split(".")
  if parts[0] == "mlp":
    if rest == "mlp.router":
      return reader.simple(prefix + "mlp.gate.weight", "linear", ours, shape, dtype)[0]
    if len(parts) == 2 and parts[1] in _DENSE:
      if len(shape) == 3:
        return reader.experts(prefix, parts[1], ours, shape, dtype)
      return reader.simple(f"{prefix}mlp.{_DENSE[parts[1]]}.weight", "linear", ours, shape, dtype)[0]
  raise UserError(f"the model's parameter {ours} has no Hugging Face counterpart (shared experts, "
                  f"sigmoid routers and extra biases are not in Llama / Qwen checkpoints): {SET_FIELDS}")


def _check_fields(cfg, path):
  """The fields that shapes cannot tell (RoPE, norm epsilon, routing) must be the checkpoint's."""
  fields = model_fields(path)
  m = cfg.model
  pairs = [("rope_theta", float(m.rope_theta), fields["rope_theta"]),
           ("norm_eps", float(m.norm_eps), fields["norm_eps"])]
  if fields["moe"]["experts"]:
    moe = fields["moe"]
    pairs += [(f"moe.{k}", type(moe[k])(m.moe[k]), moe[k])
              for k in ("top_k", "renormalize", "router", "every")]
    pairs += [("moe.dense_layers", tuple(int(i) for i in m.moe.dense_layers), moe["dense_layers"])]
  for name, ours, theirs in pairs:
    if ours != theirs:
      raise UserError(f"model.{name}={ours!r} but the checkpoint {path} has {theirs!r}: {SET_FIELDS}")


def load_params(path, params, cfg=None, *, init_copy=None):
  """A new State: `params` (an nnx State of the model's Params, from `nnx.state(model, nnx.Param)`)
  with every weight the Hugging Face checkpoint at `path` provides converted in (numpy arrays of
  the params' dtype). Mixture-of-transformers experts become copies of the text expert when
  `init_copy` (default: cfg.model.mot.init_copy); other parameters keep their values. With
  `cfg`, the fields the shapes cannot check (rope_theta, norm_eps, MoE routing) must match."""
  if init_copy is None:
    init_copy = bool(cfg is not None and cfg.model.mot.get("init_copy", False))
  hf = _read_config(path)
  ckpt = _Checkpoint(path)
  if cfg is not None:
    _check_fields(cfg, path)
  reader = _Reader(ckpt)
  flat = _flat(params)
  names = {name for name, _ in flat}
  new = {}
  depth = 0
  mot = []
  for name, var in flat:
    value = _value(var)
    shape, dtype = tuple(value.shape), np.dtype(value.dtype)
    if name in _TOP:
      key, kind = _TOP[name]
      if name == "lm_head" and key not in ckpt and hf.get("tie_word_embeddings"):
        raise UserError(f"checkpoint {path} ties its LM head to the embeddings (no {key}) but the "
                        f"model has its own lm_head: set model.tie_embeddings=True ({SET_FIELDS})")
      out, rows = reader.simple(key, kind, name, shape, dtype, grow_rows=name != "final_norm.scale")
      if out is None:  # more vocab rows than the checkpoint: the extra ones keep their init
        out = np.array(value, dtype=dtype)
        part = _to_ours(kind, ckpt.get(key), None)
        if kind == "linear":
          out[:, :rows] = part
        else:
          out[:rows] = part
      new[name] = out
      continue
    match = _BLOCK_PATH.match(name)
    if not match:
      continue  # image side (patch_in, patch_pos, modality_embed, t_in, t_out, flow_head, vit.*)
    i, rest = int(match.group(1)), match.group(2)
    depth = max(depth, i + 1)
    mot_match = _MOT_PATH.match(rest)
    if mot_match:
      mot.append((name, i, mot_match.group(2), dtype))
      continue
    new[name] = _block_param(reader, i, rest, name, shape, dtype)
  if "lm_head" not in names and "lm_head.weight" in ckpt and not hf.get("tie_word_embeddings"):
    raise UserError(f"checkpoint {path} has its own lm_head.weight (tie_word_embeddings false) but the "
                    f"model ties its LM head to the embeddings: set model.tie_embeddings=False ({SET_FIELDS})")
  reader.used.add("lm_head.weight")  # a tied checkpoint may still store it
  unused = sorted(k for k in ckpt.keys() if k not in reader.used and not _IGNORED.search(k))
  if unused:
    more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
    raise UserError(f"checkpoint tensor {unused[0]}{more} has no place in the model ({depth} blocks): "
                    f"{SET_FIELDS}")
  if init_copy:
    for name, i, rest, dtype in mot:
      source = f"blocks.{i}.{rest}"
      if source not in new:
        raise UserError(f"{name} has no counterpart {source} in the text model to copy from")
      new[name] = new[source].astype(dtype, copy=False)
  out = [(path_, var.replace(value=new[name]) if name in new else var)
         for (path_, var), (name, _) in zip(nnx.to_flat_state(params), flat)]
  return nnx.from_flat_state(out)


# ---------------------------------------------------------------------------------------------
# export


def _model_type(qk_norm, qkv_bias, experts):
  if experts:
    if not qk_norm or qkv_bias:
      raise UserError("a mixture-of-experts model exports as Qwen3-MoE, which has QK-norm and no q/k/v "
                      "biases: set model.qk_norm=True and model.qkv_bias=False")
    return "qwen3_moe"
  if qk_norm and qkv_bias:
    raise UserError("no supported Hugging Face family has both QK-norm and q/k/v biases: set "
                    "model.qk_norm or model.qkv_bias to False to export")
  return "qwen3" if qk_norm else "qwen2" if qkv_bias else "llama"


def _hf_tensors(params, cfg):
  """(config.json dict, [(HF key, float32 array)]) of the text model in `params`."""
  m = cfg.model
  values = {name: np.asarray(_value(var)) for name, var in _flat(params)}
  for need in ("embed", "final_norm.scale", "blocks.0.attn.wq"):
    if need not in values:
      raise UserError(f"the parameters have no {need}: export needs the unified model's Params")
  depth = 1 + max(int(_BLOCK_PATH.match(n).group(1)) for n in values if _BLOCK_PATH.match(n))
  vocab, width = values["embed"].shape
  _, heads, head_dim = values["blocks.0.attn.wq"].shape
  kv_heads = values["blocks.0.attn.wk"].shape[1]
  qk_norm = "blocks.0.attn.q_norm.scale" in values
  qkv_bias = "blocks.0.attn.bq" in values
  tie = "lm_head" not in values
  moe_blocks = [i for i in range(depth) if f"blocks.{i}.mlp.router" in values]
  experts = values[f"blocks.{moe_blocks[0]}.mlp.router"].shape[1] if moe_blocks else 0
  kind = _model_type(qk_norm, qkv_bias, experts)
  if m.get("image_rope_2d", False):
    raise UserError("model.image_rope_2d=True rotates text by part of each head only, unlike Hugging "
                    "Face RoPE: the exported model would not match; export a model trained without it")
  dense = [i for i in range(depth) if i not in moe_blocks]
  mlp_dim = (values[f"blocks.{dense[0]}.mlp.w_gate"].shape[1] if dense else int(m.mlp_dim))
  tensors = [("model.embed_tokens.weight", _to_hf("copy", values["embed"]))]
  for i in range(depth):
    p, b = f"model.layers.{i}.", f"blocks.{i}."
    for rest, (name, conv) in _BLOCK.items():
      if b + rest in values:
        tensors.append((p + name, _to_hf(conv, values[b + rest])))
    extra = sorted(n for n in values if n.startswith(b) and not n.startswith(b + "modality_experts.")
                   and n[len(b):] not in _BLOCK and not re.fullmatch(r"mlp\.(router|w_gate|w_up|w_down)",
                                                                     n[len(b):]))
    if extra:
      raise UserError(f"the model's parameter {extra[0]} has no Hugging Face counterpart in {kind}: "
                      "export supports Llama / Qwen2 / Qwen3 / Qwen3-MoE architectures only")
    if i in moe_blocks:
      tensors.append((p + "mlp.gate.weight", _to_hf("linear", values[b + "mlp.router"])))
      for e in range(experts):
        for name, proj in _DENSE.items():
          tensors.append((f"{p}mlp.experts.{e}.{proj}.weight", _to_hf("linear", values[f"{b}mlp.{name}"][e])))
    else:
      for name, proj in _DENSE.items():
        tensors.append((f"{p}mlp.{proj}.weight", _to_hf("linear", values[f"{b}mlp.{name}"])))
  tensors.append(("model.norm.weight", _to_hf("copy", values["final_norm.scale"])))
  if not tie:
    tensors.append(("lm_head.weight", _to_hf("linear", values["lm_head"])))

  theta = float(m.rope_theta)
  hf = {
      "architectures": [_ARCH[kind]], "model_type": kind, "vocab_size": int(vocab),
      "hidden_size": int(width), "intermediate_size": int(mlp_dim), "num_hidden_layers": int(depth),
      "num_attention_heads": int(heads), "num_key_value_heads": int(kv_heads),
      "head_dim": int(head_dim), "hidden_act": "silu", "max_position_embeddings": 32768,
      "initializer_range": 0.02, "rms_norm_eps": float(m.norm_eps), "use_cache": True,
      "tie_word_embeddings": bool(tie), "rope_theta": theta, "rope_scaling": None,
      "rope_parameters": {"rope_type": "default", "rope_theta": theta},
      "attention_dropout": 0.0, "torch_dtype": "float32", "dtype": "float32",
  }
  if kind == "llama":
    hf.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
  else:
    hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=int(depth))
    if kind != "qwen2":
      hf.update(attention_bias=False)
  if kind == "qwen3_moe":
    moe = m.moe
    if moe.get("shared_experts", 0):
      raise UserError("Qwen3-MoE has no shared experts: export a model with model.moe.shared_experts=0")
    if moe.get("router", "softmax") != "softmax":
      raise UserError(f"Qwen3-MoE routes by softmax: export a model with model.moe.router='softmax' "
                      f"(not {moe.router!r})")
    every = int(moe.get("every", 1))
    dense_layers = sorted(int(i) for i in moe.get("dense_layers", ()))
    want = [i for i in range(depth) if i not in dense_layers and (i + 1) % every == 0]
    if want != moe_blocks:
      raise UserError(f"the parameters have MoE blocks {moe_blocks} but model.moe (every={every}, "
                      f"dense_layers={dense_layers}) says {want}: pass the config the model was built from")
    hf.update(num_experts=int(experts), num_experts_per_tok=int(moe.top_k),
              moe_intermediate_size=int(values[f"blocks.{moe_blocks[0]}.mlp.w_gate"].shape[2]),
              norm_topk_prob=bool(moe.renormalize), decoder_sparse_step=every,
              mlp_only_layers=dense_layers, output_router_logits=False, router_aux_loss_coef=0.001)
  return hf, tensors


def export(params, cfg, path, max_shard_bytes=5 * 2**30):
  """Writes the text model of `params` (MoT expert 0; no image-side parameters) as a Hugging Face
  checkpoint: config.json and float32 safetensors (sharded with an index above max_shard_bytes)."""
  from safetensors.numpy import save_file
  hf, tensors = _hf_tensors(params, cfg)
  os.makedirs(path, exist_ok=True)
  for name in os.listdir(path):  # stale weights of an earlier export would mix with these
    if name in (WEIGHTS, INDEX) or _SHARD.match(name):
      os.remove(os.path.join(path, name))
  shards, current, size = [], [], 0
  for key, array in tensors:
    if current and size + array.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = [], 0
    current.append((key, np.ascontiguousarray(array, np.float32)))
    size += array.nbytes
  shards.append(current)
  meta = {"format": "pt"}
  if len(shards) == 1:
    save_file(dict(shards[0]), os.path.join(path, WEIGHTS), metadata=meta)
  else:
    weight_map, total = {}, 0
    for n, shard in enumerate(shards, 1):
      name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
      save_file(dict(shard), os.path.join(path, name), metadata=meta)
      for key, array in shard:
        weight_map[key] = name
        total += array.nbytes
    with open(os.path.join(path, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f, indent=2)
  return path


def copy_tokenizer(src, dst) -> list:
  """Copies the tokenizer files of checkpoint directory `src` into `dst`; returns their names."""
  os.makedirs(dst, exist_ok=True)
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(src, name)):
      shutil.copyfile(os.path.join(src, name), os.path.join(dst, name))
      copied.append(name)
  return copied
