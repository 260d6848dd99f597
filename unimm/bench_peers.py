"""The PyTorch peers of `python -m unimm.bench --peers`: the same model and step in transformers.

    python -m unimm.bench_peers SPEC_JSON      # what unimm.bench runs, in a subprocess

    unimm workload                    peer
    dense decoder, synthetic text     transformers LlamaForCausalLM (Qwen3ForCausalLM with
                                      QK-norm, Qwen2ForCausalLM with q/k/v biases)
    routed experts, synthetic text    transformers Qwen3MoeForCausalLM (the same experts, top-k,
                                      expert FFN, heads)
    packed text + image batches       none: the transformers models read text only
    mixture of transformers           none
    MMDiT                             diffusers FluxTransformer2DModel: not yet, unimm has no MMDiT

The peer is built from its config with random weights (nothing is downloaded), attention
"sdpa", the experts in transformers' default implementation (grouped_mm where torch has it),
and trained on random token ids of one document per row, labels = inputs, for the warm-up
and timed steps: forward and loss, backward, global-norm clipping (the config's
optim.clip_norm), torch.optim.AdamW with the config's betas and weight decay, zero_grad.
Precision as users of the Hugging Face Trainer with bf16=True run it: float32 weights,
gradients and AdamW state, forward and backward under torch.autocast(bfloat16), fused
AdamW, on CUDA with a bfloat16 config; float32 throughout on CPU. Prints one JSON line: the
peer, its settings, step_time_s {median, each}, peak_bytes (torch.cuda.max_memory_allocated
over the whole run, the weights and optimizer state included; null on CPU), params
{total, active, matmul_active} (counted as unimm.bench counts), loss, versions.
torch and transformers are imported here only (torch is a test dependency of unimm).
"""

import json
import statistics
import sys
import time


def hf_fields(m, vocab, seq_len):
  """(model_type, config fields) of the transformers model with unimm model config `m`'s text
  architecture, or (None, why not)."""
  if m.qk_norm and m.qkv_bias:
    return None, "no transformers family has both QK-norm and q/k/v biases"
  moe = m.moe
  if moe.experts and (moe.shared_experts or moe.router != "softmax" or not m.qk_norm or m.qkv_bias):
    return None, ("Qwen3-MoE, the transformers peer of routed experts, has a softmax router, no "
                  "shared experts, QK-norm and no q/k/v biases")
  kind = ("qwen3_moe" if moe.experts else "qwen3" if m.qk_norm else "qwen2" if m.qkv_bias
          else "llama")
  theta = float(m.rope_theta)
  fields = dict(vocab_size=int(vocab), hidden_size=m.width, intermediate_size=m.mlp_dim,
                num_hidden_layers=m.depth, num_attention_heads=m.heads,
                num_key_value_heads=m.kv_heads or m.heads,
                head_dim=m.head_dim or m.width // m.heads,
                hidden_act="silu", rms_norm_eps=float(m.norm_eps), max_position_embeddings=seq_len,
                rope_theta=theta, rope_parameters={"rope_type": "default", "rope_theta": theta},
                tie_word_embeddings=bool(m.tie_embeddings), use_cache=False)
  if kind == "qwen3_moe":
    fields.update(num_experts=moe.experts, num_experts_per_tok=moe.top_k,
                  moe_intermediate_size=moe.expert_dim or m.mlp_dim,
                  norm_topk_prob=bool(moe.renormalize), decoder_sparse_step=moe.every,
                  mlp_only_layers=[int(i) for i in moe.dense_layers],
                  output_router_logits=moe.lb_weight > 0, router_aux_loss_coef=float(moe.lb_weight))
  return kind, fields


def peer_spec(cfg, data, vocab):
  """What the peer subprocess needs (JSON-able), or {"note": why there is no peer}."""
  m = cfg.model
  if data != "synthetic":
    return {"note": "none: this batch packs text and flow-matched image patches under the unified "
                    "mask (Transfusion); the transformers peers read text only"}
  if max(m.mot.route) > 0:
    return {"note": "none: transformers has no mixture of transformers"}
  kind, fields = hf_fields(m, vocab, cfg.data.seq_len)
  if kind is None:
    return {"note": f"none: {fields}"}
  return {"name": kind, "model_type": kind, "hf": fields, "batch": cfg.data.batch_size,
          "seq_len": cfg.data.seq_len, "bf16": m.dtype == "bfloat16", "seed": cfg.seed,
          "optim": {"b1": cfg.optim.b1, "b2": cfg.optim.b2, "weight_decay": cfg.optim.weight_decay,
                    "lr": cfg.optim.lr, "clip_norm": cfg.optim.clip_norm}}


def counts(model):
  """{total, active, matmul_active} of a transformers causal LM, counted as unimm.bench counts."""
  config = model.config
  total = active = matmul = 0
  experts, top_k = getattr(config, "num_experts", 0), getattr(config, "num_experts_per_tok", 0)
  for name, p in model.named_parameters():
    n = p.numel()
    total += n
    if ".experts." in name and p.ndim == 3:  # fused routed experts [E, ...]
      n = n * top_k // experts
    active += n
    if p.ndim >= 2 and not ("embed_tokens" in name and not config.tie_word_embeddings):
      matmul += n
  return {"total": total, "active": active, "matmul_active": matmul}


def build(spec, device):
  """The peer model of `spec` (peer_spec), float32 with random weights, on `device` ("meta":
  shapes only)."""
  import torch
  import transformers
  config = transformers.AutoConfig.for_model(spec["model_type"], **spec["hf"])
  with torch.device(device):
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                         dtype=torch.float32)


def run(spec):
  """Trains the peer for spec's warm-up and timed steps; returns its JSON record."""
  import torch
  import transformers
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  bf16 = cuda and spec["bf16"]
  torch.manual_seed(spec["seed"])
  model = build(spec, device)
  model.train()
  o = spec["optim"]
  opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["b1"], o["b2"]),
                          weight_decay=o["weight_decay"], fused=cuda)
  b, l = spec["batch"], spec["seq_len"]
  ids = torch.randint(0, spec["hf"]["vocab_size"], (b, l), device=device)

  def step():
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o["clip_norm"])
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss

  for _ in range(spec["warmup"]):
    loss = step()
  times = []
  for _ in range(spec["steps"]):
    t = time.perf_counter()
    loss = step()
    if cuda:
      torch.cuda.synchronize()
    times.append(time.perf_counter() - t)
  return {
      "peer": f"transformers {type(model).__name__}",
      "attn_implementation": model.config._attn_implementation,
      "experts_implementation": (getattr(model.config, "_experts_implementation", None)
                                 if spec["model_type"] == "qwen3_moe" else None),
      "precision": ("float32 weights, gradients and AdamW state; bf16 autocast" if bf16
                    else "float32"),
      "optimizer": f"torch.optim.AdamW(fused={cuda})",
      "device": torch.cuda.get_device_name() if cuda else "cpu",
      "batch": b, "seq_len": l, "steps": spec["steps"], "warmup": spec["warmup"],
      "step_time_s": {"median": round(statistics.median(times), 5),
                      "each": [round(x, 5) for x in times]},
      "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
      "params": counts(model),
      "loss": loss.item(),
      "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
  }


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  print(json.dumps(run(json.loads(argv[0]))), flush=True)


if __name__ == "__main__":
  main()
