"""Hugging Face LLM interop (unimm.interop.hf_llm): tiny random Llama / Qwen2 / Qwen3 / Qwen3-MoE
models built with transformers, loaded into the unified transformer (same logits), exported back
(bit-identical round trip, transformers loads the export with the same logits), and the one-line
errors for broken checkpoints."""

import json
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from unimm import config as config_lib  # noqa: E402
from unimm.data.document import TEXT  # noqa: E402
from unimm.errors import UserError  # noqa: E402
from unimm.interop import hf_llm  # noqa: E402
from unimm.models.unified import build_model  # noqa: E402

B, L = 2, 12
VOCAB = 300
COMMON = dict(vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
              max_position_embeddings=64)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                   rope_theta=5000.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM",
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, head_dim=16)),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                       num_hidden_layers=3, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1])),
}
# the one family also saved with a small max_shard_size (an index and several shards)
SHARDED = "qwen3_moe"


def _hf_model(family, seed=0):
  conf_name, model_name, fields = FAMILIES[family]
  conf = getattr(transformers, conf_name)(**COMMON, **fields)
  conf._attn_implementation = "eager"
  torch.manual_seed(seed)
  model = getattr(transformers, model_name)(conf).float().eval()
  with torch.no_grad():  # non-trivial norms and biases, larger weights than the 0.02 init
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model


def _tokens(seed=1):
  return np.random.default_rng(seed).integers(0, VOCAB, (B, L)).astype(np.int32)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens.astype(np.int64))).logits.float().numpy()


def _our_logits(model, patcher, tokens):
  z = jnp.zeros((B, L), jnp.int32)
  logits, _, _ = model(
      jnp.asarray(tokens), jnp.zeros((B, L, patcher.patch_dim), jnp.float32), jnp.zeros((B, L)),
      jnp.full((B, L), TEXT, jnp.int32), z, z, jnp.ones((B, L), jnp.int32),
      jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L)))
  return np.asarray(logits)


def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _flat(state):
  return {".".join(str(p) for p in path): np.asarray(v.get_value())
          for path, v in nnx.to_flat_state(state)}


def _ours(path, seed=0, **model_overrides):
  cfg = config_lib.defaults()
  hf_llm.apply_model_fields(cfg, path)
  for key, value in model_overrides.items():
    if isinstance(value, dict):
      cfg.model[key].update(value)
    else:
      cfg.model[key] = value
  model, patcher = build_model(cfg, vocab_size=cfg.model.vocab_size, seed=seed)
  return cfg, model, patcher


def _save_tokenizer(path):
  """A byte-level BPE trained on a few strings (saved next to a Qwen2 config.json, AutoTokenizer
  builds a Qwen2Tokenizer from its vocab and merges: a WordLevel tokenizer would not survive that)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(
      ["a red square on a blue circle", "the green triangle is small"] * 3,
      trainers.BpeTrainer(vocab_size=VOCAB - 3, special_tokens=["<|endoftext|>"],
                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """family -> (directory, HF model, HF logits of _tokens())."""
  out = {}
  for family in FAMILIES:
    model = _hf_model(family)
    path = str(tmp_path_factory.mktemp(family))
    shard = "4KB" if family == SHARDED else "5GB"
    model.save_pretrained(path, max_shard_size=shard)
    out[family] = (path, model, _hf_logits(model, _tokens()))
  _save_tokenizer(out["qwen2"][0])
  return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_import_export_parity(family, checkpoints, tmp_path):
  path, hf_model, hf_logits = checkpoints[family]
  assert os.path.isfile(os.path.join(path, hf_llm.INDEX)) == (family == SHARDED)
  fields = hf_llm.model_fields(path)
  assert (fields["qk_norm"], fields["qkv_bias"]) == (family.startswith("qwen3"), family == "qwen2")
  cfg, model, patcher = _ours(path)
  params = hf_llm.load_params(path, nnx.state(model, nnx.Param), cfg)
  before = _flat(nnx.state(model, nnx.Param))
  nnx.update(model, params)
  rel = _rel(_our_logits(model, patcher, _tokens()), hf_logits)
  print(f"{family}: max |ours - hf| / max |hf| = {rel:.2e}")
  assert rel <= 1e-4

  loaded = _flat(params)
  for name in ("patch_pos", "modality_embed", "t_in", "t_out", "flow_head", "patch_in"):
    np.testing.assert_array_equal(loaded[name], before[name])  # image side keeps its init
  assert ("lm_head" in loaded) == (family != "qwen2")

  # export (sharded for one family) -> import into a differently initialised model: bit-identical
  out = str(tmp_path / "export")
  hf_llm.export(params, cfg, out, max_shard_bytes=20_000 if family == "llama" else 2**30)
  assert os.path.isfile(os.path.join(out, hf_llm.INDEX)) == (family == "llama")
  assert hf_llm.model_fields(out) == fields
  _, fresh, _ = _ours(out, seed=7)
  again = _flat(hf_llm.load_params(out, nnx.state(fresh, nnx.Param), cfg))
  hf_side = [n for n in loaded if n in ("embed", "lm_head", "final_norm.scale")
             or n.startswith("blocks.")]
  for name in hf_side:
    np.testing.assert_array_equal(again[name], loaded[name], err_msg=name)

  # transformers reads the export: no missing / unexpected keys, the same logits
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["model_type"] == family
  back, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, output_loading_info=True, attn_implementation="eager")
  assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
  assert type(back).__name__ == type(hf_model).__name__
  np.testing.assert_allclose(_hf_logits(back.float().eval(), _tokens()), hf_logits, rtol=0, atol=1e-5)


def test_fused_expert_layout(checkpoints, tmp_path):
  """transformers 5.x's in-memory fused experts (save_original_format=False) load the same."""
  _, hf_model, hf_logits = checkpoints["qwen3_moe"]
  path = str(tmp_path / "fused")
  hf_model.save_pretrained(path, save_original_format=False)
  from safetensors import safe_open
  with safe_open(os.path.join(path, hf_llm.WEIGHTS), "np") as f:
    assert "model.layers.0.mlp.experts.gate_up_proj" in f.keys()
  cfg, model, patcher = _ours(path)
  nnx.update(model, hf_llm.load_params(path, nnx.state(model, nnx.Param), cfg))
  assert _rel(_our_logits(model, patcher, _tokens()), hf_logits) <= 1e-4


def test_mot_copies_and_vocab_growth(checkpoints, tmp_path):
  path, _, hf_logits = checkpoints["llama"]
  for init_copy in (False, True):
    cfg, model, patcher = _ours(path, vocab_size=384, mot=dict(route=(0, 0, 1), init_copy=init_copy))
    before = _flat(nnx.state(model, nnx.Param))
    loaded = _flat(hf_llm.load_params(path, nnx.state(model, nnx.Param), cfg))
    np.testing.assert_array_equal(loaded["embed"][VOCAB:], before["embed"][VOCAB:])
    np.testing.assert_array_equal(loaded["lm_head"][:, VOCAB:], before["lm_head"][:, VOCAB:])
    experts = [n for n in loaded if ".modality_experts.0." in n]
    assert len(experts) == 9 * 2  # norms, q/k/v/o, gate/up/down per block
    for name in experts:
      source = name.replace(".modality_experts.0.", ".")
      want = loaded[source] if init_copy else before[name]
      np.testing.assert_array_equal(loaded[name], want, err_msg=name)
    if init_copy:  # text tokens run expert 0: still Llama's logits
      params = hf_llm.load_params(path, nnx.state(model, nnx.Param), cfg)
      nnx.update(model, params)
      rel = _rel(_our_logits(model, patcher, _tokens())[..., :VOCAB], hf_logits)
      assert rel <= 1e-4
      out = hf_llm.export(params, cfg, str(tmp_path / "mot"))  # the text expert only
      from safetensors import safe_open
      with safe_open(os.path.join(out, hf_llm.WEIGHTS), "np") as f, \
          safe_open(os.path.join(path, hf_llm.WEIGHTS), "np") as g:
        assert set(f.keys()) == set(g.keys())
        np.testing.assert_array_equal(f.get_tensor("lm_head.weight")[:VOCAB], g.get_tensor("lm_head.weight"))


def test_tokenizer(checkpoints, tmp_path):
  from unimm.data.tokenizer import load_tokenizer
  path = checkpoints["qwen2"][0]
  tok = load_tokenizer(path)
  assert tok.hf.convert_ids_to_tokens(tok.eos_id) == "<|endoftext|>"
  assert tok.vocab_size <= VOCAB  # the BPE and <bos>, <boi>, <eoi> fit the model's vocabulary
  assert tok.decode(tok.encode("a red circle, the green square!")) == "a red circle, the green square!"
  copied = hf_llm.copy_tokenizer(path, str(tmp_path))
  assert "tokenizer.json" in copied
  assert load_tokenizer(str(tmp_path)).encode("the small square") == tok.encode("the small square")


def _error(fn):  # returns the message (printed with -s)
  with pytest.raises(UserError) as e:
    fn()
  message = str(e.value)
  print("error:", message)
  assert "\n" not in message
  return message


def test_errors(checkpoints, tmp_path):
  path = checkpoints[SHARDED][0]
  cfg, model, _ = _ours(path)
  state = nnx.state(model, nnx.Param)

  broken = str(tmp_path / "broken")
  shutil.copytree(path, broken)
  with open(os.path.join(broken, hf_llm.INDEX)) as f:
    shard = sorted(set(json.load(f)["weight_map"].values()))[1]
  os.remove(os.path.join(broken, shard))
  message = _error(lambda: hf_llm.load_params(broken, state, cfg))
  assert shard in message and hf_llm.INDEX in message and "copy all shards" in message

  cfg2, model2, _ = _ours(path, mlp_dim=40)  # the dense block (mlp_only_layers) is 48 wide
  message = _error(lambda: hf_llm.load_params(path, nnx.state(model2, nnx.Param), cfg2))
  assert "blocks.1.mlp.w_down" in message and "(32, 48)" in message and "(40, 32)" in message
  assert "model.init_from" in message

  cfg3, model3, _ = _ours(path, qk_norm=False)
  message = _error(lambda: hf_llm.load_params(path, nnx.state(model3, nnx.Param), cfg3))
  assert "_norm.weight" in message and "no place in the model" in message

  cfg4, model4, _ = _ours(path, moe=dict(top_k=3))
  message = _error(lambda: hf_llm.load_params(path, nnx.state(model4, nnx.Param), cfg4))
  assert "model.moe.top_k=3" in message and "2" in message

  llama = checkpoints["llama"][0]
  message = _error(lambda: hf_llm.load_params(llama, state, cfg))  # a Qwen3-MoE model, Llama weights
  assert "model.init_from" in message
  cfg5, model5, _ = _ours(llama, qkv_bias=True)
  message = _error(lambda: hf_llm.load_params(llama, nnx.state(model5, nnx.Param), cfg5))
  assert "no tensor model.layers.0.self_attn.k_proj.bias" in message and "blocks.0.attn.bk" in message

  def rewrite(name, **changes):
    d = str(tmp_path / name)
    shutil.copytree(llama, d)
    with open(os.path.join(d, "config.json")) as f:
      conf = json.load(f)
    conf.update(changes)
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump(conf, f)
    return d

  message = _error(lambda: hf_llm.model_fields(rewrite("gpt2", model_type="gpt2")))
  assert "model_type 'gpt2' is not supported" in message and "Qwen3-MoE" in message
  scaled = rewrite("scaled", rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0})
  assert "llama3" in _error(lambda: hf_llm.model_fields(scaled))
  assert hf_llm.model_fields(rewrite("legacy", rope_parameters=None, rope_theta=123.0,
                                     rope_scaling=None))["rope_theta"] == 123.0

  bin_only = str(tmp_path / "bin_only")
  os.makedirs(bin_only)
  shutil.copy(os.path.join(llama, "config.json"), bin_only)
  nothing = str(tmp_path / "nothing")
  shutil.copytree(bin_only, nothing)
  open(os.path.join(bin_only, "pytorch_model.bin"), "wb").close()
  assert ".bin" in _error(lambda: hf_llm.load_params(bin_only, state, cfg))
  assert "no model.safetensors" in _error(lambda: hf_llm.load_params(nothing, state, cfg))


def test_bf16_checkpoint(checkpoints, tmp_path):
  """bfloat16 safetensors (most hub checkpoints) load as float32 values of the same numbers."""
  import copy
  path, hf_model, _ = checkpoints["llama"]
  half = copy.deepcopy(hf_model).to(torch.bfloat16)
  half.save_pretrained(str(tmp_path))
  cfg, model, _ = _ours(str(tmp_path))
  loaded = _flat(hf_llm.load_params(str(tmp_path), nnx.state(model, nnx.Param), cfg))
  want = half.model.layers[1].self_attn.k_proj.weight.detach().float().numpy()
  np.testing.assert_array_equal(loaded["blocks.1.attn.wk"].reshape(want.shape[1], -1).T, want)
  np.testing.assert_array_equal(loaded["embed"], half.model.embed_tokens.weight.detach().float().numpy())


def test_training_starts_from_a_checkpoint(checkpoints, tmp_path):
  """model.init_from: the checkpoint's architecture fields replace the config's, its weights
  (and, with mot.init_copy, the generation expert) start the run, its tokenizer feeds the data;
  with mot.freeze_text two train steps leave the language model bit-identical."""
  import jax
  from tests.helpers import tiny_config
  from unimm.train.loop import Run
  path = checkpoints["qwen2"][0]
  c = tiny_config()
  c.model.update(init_from=path, image_rope_2d=False)
  c.model.mot.update(route=(0, 0, 1), init_copy=True, freeze_text=True)
  c.data.update(tokenizer=path, seq_len=128, batch_size=2)
  c.data.tasks = dict(t2i=1.0, caption=1.0)
  run = Run(c, str(tmp_path), devices=jax.devices()[:1])
  assert (c.model.width, c.model.qkv_bias, c.model.tie_embeddings) == (32, True, True)
  assert c.model.vocab_size == VOCAB and run.tokenizer.vocab_size <= VOCAB
  state = run.restore_or_init()
  want = hf_llm.load_params(path, jax.device_get(state["params"]), c)
  got = jax.device_get(state["params"])
  for name, value in _flat(want).items():
    np.testing.assert_array_equal(_flat(got)[name], value, err_msg=name)
  block = got["blocks"][0]
  np.testing.assert_array_equal(np.asarray(block["attn"]["wq"].get_value()),
                                np.asarray(block["modality_experts"][0]["attn"]["wq"].get_value()))
  state = run.train(state, steps=2, log=lambda s: None)
  after = _flat(jax.device_get(state["params"]))
  text = [n for n in after if n.split(".")[0] in ("embed", "final_norm")
          or (n.startswith("blocks.") and n.split(".")[2] != "modality_experts")]
  image = [n for n in after if n.startswith("blocks.") and n.split(".")[2] == "modality_experts"
           and "norm" not in n]
  assert text and image
  for name in text:
    np.testing.assert_array_equal(after[name], _flat(want)[name], err_msg=name)
  assert any(np.abs(after[n] - _flat(want)[n]).max() > 0 for n in image)
