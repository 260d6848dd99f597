"""The PyTorch peers of `python -m unimm.bench --peers`: the same model and step in transformers
or diffusers.

    python -m unimm.bench_peers SPEC_JSON      # what unimm.bench runs, in a subprocess

    unimm workload                    peer
    dense decoder, synthetic text     transformers LlamaForCausalLM (Qwen3ForCausalLM with
                                      QK-norm, Qwen2ForCausalLM with q/k/v biases)
    routed experts, synthetic text    transformers Qwen3MoeForCausalLM (the same experts, top-k,
                                      expert FFN, heads)
    packed text + image batches       none: the transformers models read text only
    mixture of transformers           none
    MMDiT (FLUX layout), synthetic    diffusers FluxTransformer2DModel of the same shape (see below)

The transformers peer is built from its config with random weights (nothing is downloaded),
attention "sdpa", the experts in transformers' default implementation (grouped_mm where torch
has it), and trained on random token ids of one document per row, labels = inputs, for the warm-up
and timed steps: forward and loss, backward, global-norm clipping (the config's
optim.clip_norm), torch.optim.AdamW with the config's betas and weight decay, zero_grad.
Precision as users of the Hugging Face Trainer with bf16=True run it: float32 weights,
gradients and AdamW state, forward and backward under torch.autocast(bfloat16), fused
AdamW, on CUDA with a bfloat16 config; float32 throughout on CPU. Prints one JSON line: the
peer, its settings, step_time_s {median, each}, peak_bytes (torch.cuda.max_memory_allocated
over the whole run, the weights and optimizer state included; null on CPU), params
{total, active, matmul_active} (counted as unimm.bench counts), loss, versions.

**The MMDiT's peer** (model.family="mmdit", variant "flux", the "text" conditioner, no Kontext
reference slot, QK-norm and q/k/v biases, mlp_ratio 4: what diffusers' FLUX has):
FluxTransformer2DModel(num_layers=model.depth, num_single_layers=model.mmdit.single_depth,
num_attention_heads=model.heads, attention_head_dim=head_dim, axes_dims_rope=axes_dims,
joint_attention_dim = the width of our text features (the text encoder's: model.width),
in_channels / out_channels = the MMDiT's image-stream input / output width (the patch
vector; FLUX.1's 64 are 16 latent channels in 2 x 2 patches), pooled_projection_dim =
model.mmdit.pooled_dim (768 where it is 0: diffusers' FLUX always embeds a pooled vector),
guidance_embeds = model.mmdit.guidance_embed), attention through diffusers' dispatcher at its
default backend ("native": torch.nn.functional.scaled_dot_product_attention; the record says
which), random weights. Each step: random hidden_states [B, N, in], encoder_hidden_states
[B, L - N, joint_attention_dim], pooled_projections, timestep in [0, 1), img_ids (0, row, col)
and txt_ids (zeros) as our flux variant makes them, guidance 1 when embedded; loss = MSE
against a random [B, N, out] target; then the same backward, clipping and AdamW as above, the
same precision. Its params: {total, active, matmul_active, matmul: {image, text, joint,
row}}, counted as `unimm.bench.mmdit_parameter_summary` counts ours. It takes its text
features as given: unimm's token table and text norm (and with model.condition.depth > 0 its
text encoder's blocks, counted in unimm's useful FLOPs only) are work the peer does not do.
Its record: peer, attention_backend, precision, optimizer, device, batch, seq_len (N + L - N),
image_tokens, text_tokens, steps, warmup, step_time_s, peak_bytes, params, loss, versions
{torch, diffusers}.

torch, transformers and diffusers are imported here only (torch is a test dependency of unimm).
"""

import json
import math
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


def flux_fields(cfg, vocab):
  """(FluxTransformer2DModel config fields, image tokens N, text tokens L - N) of the MMDiT of
  `cfg`, or (None, why not, None)."""
  from unimm.image_grid import image_grid  # pylint: disable=import-outside-toplevel
  m = cfg.model
  x = m.mmdit
  if x.variant != "flux":
    return None, (f"model.mmdit.variant='{x.variant}': diffusers' SD3 / Qwen-Image "
                  "transformers are no peer here yet"), None
  if m.condition.encoder != "text":
    return None, ("the peer takes precomputed text features; unimm's conditioner here is "
                  f"'{m.condition.encoder}', not the text encoder"), None
  if x.edit == "kontext" and x.references:
    return None, ("model.mmdit.edit='kontext' appends reference slots to the image stream; "
                  "set edit='none' for the peer's text-to-image step"), None
  if not (m.qk_norm and m.qkv_bias) or float(x.mlp_ratio) != 4.0:
    return None, "diffusers' FLUX has QK RMSNorm, q/k/v biases and MLPs of 4 x the width", None
  grid = image_grid(cfg, vocab)
  head_dim = m.head_dim or m.width // m.heads
  patch = grid.patch_dim
  fields = dict(patch_size=1, in_channels=int(x.in_channels or (2 * patch if x.edit == "concat"
                                                                else patch)),
                out_channels=int(x.out_channels or patch), num_layers=int(m.depth),
                num_single_layers=int(x.single_depth), attention_head_dim=int(head_dim),
                num_attention_heads=int(m.heads), joint_attention_dim=int(x.context_dim or m.width),
                pooled_projection_dim=int(x.pooled_dim or 768),
                guidance_embeds=bool(x.guidance_embed),
                axes_dims_rope=[int(a) for a in x.axes_dims])
  n = grid.num_patches
  return fields, n, cfg.data.seq_len - n


def peer_spec(cfg, data, vocab):
  """What the peer subprocess needs (JSON-able), or {"note": why there is no peer}."""
  m = cfg.model
  optim = {"b1": cfg.optim.b1, "b2": cfg.optim.b2, "weight_decay": cfg.optim.weight_decay,
           "lr": cfg.optim.lr, "clip_norm": cfg.optim.clip_norm}
  if getattr(m, "family", "unified") == "mmdit":
    if data != "synthetic":
      return {"note": "none: the diffusers peer trains on random full streams; compare the "
                      "MMDiT on --data synthetic"}
    fields, n, text = flux_fields(cfg, vocab)
    if fields is None:
      return {"note": f"none: {n}"}
    return {"name": "diffusers FluxTransformer2DModel", "family": "mmdit", "flux": fields,
            "batch": cfg.data.batch_size, "seq_len": cfg.data.seq_len, "image_tokens": n,
            "text_tokens": text, "grid": int(math.isqrt(n)), "bf16": m.dtype == "bfloat16",
            "seed": cfg.seed, "optim": optim}
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
          "optim": optim}


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


# FluxTransformer2DModel's parameters by the tokens they multiply (unimm.bench.mmdit_stream).
FLUX_ROW = ("time_text_embed.", "norm_out.", ".norm1.", ".norm1_context.", ".norm.linear")
FLUX_TEXT = ("context_embedder.", ".add_q_proj.", ".add_k_proj.", ".add_v_proj.", ".to_add_out.",
             ".ff_context.")


def flux_stream(name):
  """"image", "text", "joint" or "row" for a FluxTransformer2DModel parameter name."""
  if name.startswith("single_transformer_blocks."):
    return "row" if ".norm.linear" in name else "joint"
  dotted = "." + name
  if any(k in dotted for k in FLUX_ROW):
    return "row"
  if any(k in dotted for k in FLUX_TEXT):
    return "text"
  return "image"  # x_embedder, proj_out, the double blocks' to_q / to_k / to_v / to_out / ff


def flux_counts(model):
  """{total, active, matmul_active, matmul: {image, text, joint, row}} of the diffusers peer,
  counted as unimm.bench.mmdit_parameter_summary counts the MMDiT: weights of 2 or more dims
  (Linear weights; biases and RMSNorm scales are 1-D)."""
  total, matmul = 0, dict.fromkeys(("image", "text", "joint", "row"), 0)
  for name, p in model.named_parameters():
    total += p.numel()
    if p.ndim >= 2:
      matmul[flux_stream(name)] += p.numel()
  return {"total": total, "active": total, "matmul_active": sum(matmul.values()),
          "matmul": matmul}


def build(spec, device):
  """The peer model of `spec` (peer_spec), float32 with random weights, on `device` ("meta":
  shapes only)."""
  import torch
  if spec.get("family") == "mmdit":
    import diffusers
    with torch.device(device):
      return diffusers.FluxTransformer2DModel(**spec["flux"])  # float32
  import transformers
  config = transformers.AutoConfig.for_model(spec["model_type"], **spec["hf"])
  with torch.device(device):
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                         dtype=torch.float32)


def attention_backend():
  """diffusers' active attention backend (its dispatcher's; "native" is torch SDPA)."""
  try:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    name = _AttentionBackendRegistry.get_active_backend()[0]
    name = getattr(name, "value", name)
  except (ImportError, AttributeError):
    return "unknown"
  return (f"{name} (torch.nn.functional.scaled_dot_product_attention)" if name == "native"
          else str(name))


def start(spec):
  """(the peer model of spec in training mode, seeded; cuda?, its device, bf16 autocast?)."""
  import torch
  cuda = torch.cuda.is_available()
  device = "cuda" if cuda else "cpu"
  torch.manual_seed(spec["seed"])
  model = build(spec, device)
  model.train()
  return model, cuda, device, cuda and spec["bf16"]


def train_timed(spec, model, loss_fn, cuda, device, bf16):
  """Trains `model` on loss_fn() (AdamW, gradient clipping, bf16 autocast when `bf16`, from
  start()) for spec's warm-up and timed steps: (the last loss, the timed steps' seconds)."""
  import torch
  o = spec["optim"]
  opt = torch.optim.AdamW(model.parameters(), lr=o["lr"], betas=(o["b1"], o["b2"]),
                          weight_decay=o["weight_decay"], fused=cuda)

  def step():
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=bf16):
      loss = loss_fn()
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
  return loss, times


def run_flux(spec):
  """The MMDiT's peer: diffusers FluxTransformer2DModel trained on random tensors (module
  docstring); returns its JSON record."""
  import diffusers
  import torch
  model, cuda, device, bf16 = start(spec)
  f = spec["flux"]
  b, n, lt, g = spec["batch"], spec["image_tokens"], spec["text_tokens"], spec["grid"]
  hidden = torch.randn(b, n, f["in_channels"], device=device)
  context = torch.randn(b, lt, f["joint_attention_dim"], device=device)
  pooled = torch.randn(b, f["pooled_projection_dim"], device=device)
  t = torch.rand(b, device=device)
  rows, cols = torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij")
  img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).float().to(device)
  txt_ids = torch.zeros(lt, 3, device=device)
  guidance = torch.ones(b, device=device) if f["guidance_embeds"] else None
  target = torch.randn(b, n, f["out_channels"], device=device)

  def loss_fn():
    out = model(hidden_states=hidden, encoder_hidden_states=context, pooled_projections=pooled,
                timestep=t, img_ids=img_ids, txt_ids=txt_ids, guidance=guidance,
                return_dict=False)[0]
    return torch.nn.functional.mse_loss(out.float(), target)

  loss, times = train_timed(spec, model, loss_fn, cuda, device, bf16)
  return {
      "peer": f"diffusers {type(model).__name__}",
      "attention_backend": attention_backend(),
      "precision": ("float32 weights, gradients and AdamW state; bf16 autocast" if bf16
                    else "float32"),
      "optimizer": f"torch.optim.AdamW(fused={cuda})",
      "device": torch.cuda.get_device_name() if cuda else "cpu",
      "batch": b, "seq_len": spec["seq_len"], "image_tokens": n, "text_tokens": lt,
      "steps": spec["steps"], "warmup": spec["warmup"],
      "step_time_s": {"median": round(statistics.median(times), 5),
                      "each": [round(x, 5) for x in times]},
      "peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
      "params": flux_counts(model),
      "loss": loss.item(),
      "versions": {"torch": torch.__version__, "diffusers": diffusers.__version__},
  }


def run(spec):
  """Trains the peer for spec's warm-up and timed steps; returns its JSON record."""
  if spec.get("family") == "mmdit":
    return run_flux(spec)
  import torch
  import transformers
  model, cuda, device, bf16 = start(spec)
  b, l = spec["batch"], spec["seq_len"]
  ids = torch.randint(0, spec["hf"]["vocab_size"], (b, l), device=device)
  loss, times = train_timed(spec, model, lambda: model(input_ids=ids, labels=ids).loss, cuda,
                            device, bf16)
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
