"""Configs are code: ml_collections files with `get_config()`, plus dotted overrides.

    python -m unimm.train --config configs/demo.py --config.train.steps=300 --workdir runs/demo

`defaults()` holds every field once, with its one meaning; a recipe file in
`configs/` starts from it and changes what the recipe needs. Overrides are typed
by the field they replace; a misspelt key fails at once, naming the nearest keys.
"""

import ast
import difflib
import importlib.util
import os

import ml_collections

from unimm.errors import UserError

# Logical axis name -> mesh axes. Model code names logical axes only; this table
# decides the parallelism (MaxText's logical_axis_rules).
DEFAULT_RULES = (
    # activations
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("patch", None),
    ("norm", None),
    ("positions", None),
    ("exp", "expert"),
)


def defaults() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # params init, data order and per-step noise all derive from it

  c.model = dict(
      family="unified",    # "unified" (the unified transformer, unimm.models.unified) or "mmdit"
                           # (conditioner + multimodal diffusion transformer, unimm.models.conditioning)
      width=256,           # residual stream width
      depth=4,             # transformer blocks
      heads=4,             # attention (query) heads
      kv_heads=0,          # key/value heads (grouped-query attention); 0: heads
      head_dim=0,          # per-head width; 0: width // heads
      mlp_dim=768,         # SwiGLU hidden width (dense blocks)
      vocab_size=0,        # embedding rows; 0: the text tokenizer's (rounded up to 128)
      qk_norm=True,        # RMSNorm on each head's queries and keys (Qwen3, BAGEL); False: Llama, Qwen2
      qkv_bias=False,      # biases on the q/k/v projections (Qwen2)
      norm_eps=1e-6,       # RMSNorm epsilon
      tie_embeddings=False,  # the LM head is the transposed embedding table
      init_from="",        # a local Hugging Face LLM directory (Llama, Qwen2/2.5, Qwen3, Qwen3-MoE): its
                           # architecture fields replace these and its weights initialise the text model;
                           # family "mmdit": a diffusers FLUX / SD3 / Qwen-Image transformer directory (or
                           # a BFL FLUX .safetensors file) initialises the MMDiT
      moe=dict(            # routed feed-forward (HunyuanImage 3.0, Qwen3-MoE); experts=0: dense blocks
          experts=0,       # routed experts per MoE block
          top_k=2,         # experts per token
          expert_dim=0,    # hidden width of each expert's SwiGLU; 0: mlp_dim
          shared_experts=0,  # always-on experts (one SwiGLU of shared_experts * expert_dim)
          router="softmax",  # expert scores: "softmax" or "sigmoid" (of the router logits)
          renormalize=True,  # top-k weights divided by their sum
          impl="auto",     # grouped matmul: "ragged" (jax.lax.ragged_dot, dropless), "einsum" (capacity-
                           # padded batched einsum), "tokamax" (tokamax.ragged_dot, GPU, optional extra),
                           # "megablox" (Pallas TPU grouped matmul) or "auto" (tokamax on GPU when
                           # installed, megablox on TPU, ragged elsewhere; all dropless)
          capacity_factor=0.0,  # einsum: slots per expert = cf * tokens * top_k / experts, overflow dropped
                           # and counted; 0: dropless (slots = tokens)
          every=1,         # block i is MoE when (i + 1) % every == 0 (Qwen3-MoE decoder_sparse_step)
          dense_layers=(), # blocks that stay dense (Qwen3-MoE mlp_only_layers)
          lb_weight=0.01,  # load-balancing loss weight (Switch: experts * sum_e load_e * mean prob_e)
          z_weight=1e-3,   # router z-loss weight (mean logsumexp(logits)^2)
      ),
      mot=dict(            # mixture of transformers: per-modality QKV/O, norms and FFN, one shared attention
          route=(0, 0, 0), # expert of (text, condition image, generated image) tokens: (0, 0, 1) BAGEL,
                           # (0, 1, 1) LMFusion; the number of experts is max + 1
          freeze_text=False,  # expert 0 and the embeddings / LM head get no updates (LMFusion)
          init_copy=False, # other experts start as copies of expert 0 (BAGEL)
      ),
      mmdit=dict(           # model.family="mmdit": the multimodal diffusion transformer (SD3 / FLUX / Qwen-Image)
          variant="flux",   # "flux" (double + single blocks, 3-axis RoPE), "sd3" (double blocks, 2-D sin-cos
                            # position table, last block context_pre_only), "qwen" (double blocks, MSRoPE, text RMSNorm)
          single_depth=0,   # single-stream (parallel attention + MLP) blocks after the double ones (flux)
          mlp_ratio=4.0,
          context_dim=0,    # width of the conditioning features entering the text stream (T5 4096, Qwen2.5-VL 3584); 0: width
          pooled_dim=0,     # pooled text vector added to the timestep embedding (CLIP: 768 flux, 2048 sd3); 0: none
          guidance_embed=False,  # distilled guidance scale embedded like t (FLUX.1-dev)
          axes_dims=(16, 56, 56),  # RoPE dims per id axis (frame, row, col); sum = head_dim
          pos_embed_max_size=0,  # sd3: side of the 2-D sin-cos position table (192 for SD3-Medium)
          in_channels=0,    # image-stream input width; 0: the image tokenizer's patch_dim (2x with edit="concat")
          out_channels=0,   # 0: patch_dim
          edit="kontext",   # condition images of a document: "kontext" (appended to the image stream, RoPE frame
                            # 1, 2, ...; FLUX.1 Kontext, OmniGen), "concat" (the aligned source patches
                            # concatenated to the target's channels; InstructPix2Pix) or "none"
          references=1,     # kontext: condition images appended to the image stream, at most
      ),
      condition=dict(      # model.family="mmdit": what the text stream holds
          encoder="text",   # "text" (a small trainable text encoder), "llm" (final hidden states of the frozen
                            # unified model in `llm`: Qwen-Image), "metaquery" (learnable queries through it
                            # and a trainable connector: MetaQuery) or "seed" (the target image through a
                            # query tokenizer: SEED-LLaMA's tokenizer and decoder, trained as an autoencoder)
                            # or "vq" (the target image's codes of the VQ tokenizer in `tokenizer`:
                            # X-Omni's diffusion decoder, rendering codes an LLM generates)
          llm="",           # llm / metaquery: the workdir of a trained unified model (frozen)
          text_len=0,       # text / llm: the text stream's length (0: every text position a row can
                            # hold besides the target); a longer text keeps its first text_len tokens,
                            # its rows counted in the train metric text_cut
          tokenizer="",     # vq: the workdir of a VQ tokenizer (python -m unimm.train.autoencoder), frozen
          depth=2,          # blocks of the text / code encoder, the connector or seed's causal Q-Former
          queries=16,       # seed: codes an image (a square number: the LLM's grid of them)
          vit_depth=2,      # seed: blocks of its ViT over the image's patches
          levels=(8, 5, 5, 5),  # seed: the FSQ codebook (prod(levels) codes)
          recon_weight=0.0,  # seed: weight of the MLP pixel decoder's reconstruction loss on the codes
      ),
      patch_size=8,        # image patch side in pixels (image tokenizer "pixels")
      image_tokenizer="pixels",  # image tokens: "pixels" (patches), "vae" (latent patches), "vq" (codes) or
                           # "seed" (codes of a query tokenizer: an MMDiT workdir, model.condition.encoder="seed")
      tokenizer_path="",   # vae / vq: workdir of a tokenizer trained by python -m unimm.train.autoencoder; seed:
                           # of one trained by python -m unimm.train
      latent_patch=2,      # vae: latents per token side (a token covers f * latent_patch pixels)
      image_decoder="",    # vq: an MMDiT workdir trained with model.condition.encoder="vq" on the same
                           # tokenizer renders the generated codes (X-Omni) instead of the tokenizer's decoder
      image_loss="flow",   # target images: "flow" (pixels, vae), "next_token" (vq: Chameleon / Emu3
                           # early fusion), "masked" (vq: MaskGIT masked-token prediction) or "mar"
                           # (pixels, vae: Harmon / MAR, masked tokens drawn by a per-token diffusion MLP)
      mar=dict(            # image_loss "mar"
          head_width=256,  # the per-token diffusion MLP (MAR's SimpleMLPAdaLN)
          head_depth=3,
          mask_min=0.7,    # each target image masks a share of its tokens drawn from N(1, 0.25)
                           # truncated to [mask_min, 1] (MAR)
          t_repeat=4,      # flow times drawn per masked token and step (MAR's diffusion_batch_mul)
          max_tokens=0,    # positions of a row the MLP trains on (masked ones first, a random subset
                           # if more); 0: every position
      ),
      understanding="shared",  # condition images: "shared" (the image tokenizer) or "pixels"
                           # (vq only, Janus-Pro: pixel patches of model.patch_size into a ViT)
      vit_depth=0,         # understanding="pixels": bidirectional blocks over each condition image
      mask_loss_weight=1.0,  # masked: loss = text ce + this * masked-token ce
      text_loss="next_token",  # text: "next_token" (causal LM), "masked" (absorbing-state masked diffusion
                           # with the ELBO's 1/t weight: MMaDA / LLaDA) or "flow" (discrete flow matching on
                           # a metric-induced path: FUDOKI); both diffusions make each document
                           # bidirectional and need vq codes with image_loss "masked"
      text_flow=dict(      # text_loss "flow": p_t(x | x1) ~ exp(-beta(t) d(x, x1)), d = 1 - cos of the token
                           # embeddings, beta(t) = beta_scale ((1 - t) / t)^beta_power (t = 1: uniform)
          beta_scale=0.0,  # 0: log of the text vocabulary (at t = 0.5, x1 keeps half the probability
                           # against tokens at distance 1)
          beta_power=1.0,
      ),
      prediction="x0",     # "x0": network predicts the clean image, converted to velocity; "velocity"
      rope_theta=10_000.0,
      image_rope_2d=False, # image patches also rotate by (row, col) in half of each head's dims
      edit_source="none",  # edits: "input" (a noised target patch also embeds the clean patch at its place in
                           # the document's last condition image: InstructPix2Pix-style alignment, added),
                           # "residual" (that, and the x0 prediction is relative to the source patch) or "none"
      dtype="float32",     # compute dtype: "float32" or "bfloat16" (params stay float32)
      attention="auto",    # "xla" (dense mask built from ids), "flash" (Pallas kernel building each
                           # mask tile from the ids: Triton on GPU, Mosaic on TPU, interpreted on CPU),
                           # "cudnn" (GPU; text-only causal / packed rows, else flash) or "auto" (GPU:
                           # cudnn, TPU: flash, CPU: xla)
      scan=False,          # run the blocks as jax.lax.scan over stacked parameters (repeated units)
      remat="none",        # per block: "none" (keep activations), "full" (recompute the block),
                           # "save_dots" (keep weight matmul outputs), "offload" (them, in host memory)
      ce_chunk=0,          # >0: logits and cross-entropy this many positions at a time (never the
                           # whole [B, L, vocab] in float32); 0: all at once
  )
  c.data = dict(
      image_size=32,
      seq_len=256,         # packed sequence length
      batch_size=16,       # global batch (rows of seq_len tokens)
      tasks=dict(t2i=0.45, caption=0.25, qa=0.1, edit=0.15, story=0.05),
      two_object_prob=0.3,
      cfg_dropout=0.1,     # drop the condition text of generation targets (classifier-free guidance)
      image_dropout=0.0,   # drop the condition images before a target, drawn independently of the text
                           # (InstructPix2Pix's three-way dropout: text, image, both; two-scale guidance)
      tokenizer="byte",    # "byte" (needs no download), "shapes" (one id a word of the Shapes world's
                           # texts; for Shapes recipes only) or a local tokenizer directory
      num_workers=0,       # Grain worker processes (0: in-process); a checkpoint resumes only with the same count
      shards=0,            # data streams the global batch is read from (0: one per process); fixed, the
                           # batches and a checkpoint's data state do not depend on the process count
      read_threads=2,      # threads per process (or worker) decoding records ahead of packing
      pack_bins=8,         # first-fit packing bins
      docs_per_row=0,      # at most this many documents packed into a row; 0: as many as fit (the MMDiT: 1)
      # "name[:weight],...": "shapes" (built in) or a folder written by `python -m unimm.data.convert`
      mixture="shapes",
      max_aspect=1.0,      # >1: images go to aspect-ratio buckets up to this ratio (1: centre-cropped squares)
      pair_caption_prob=0.3,  # share of converted image-text pairs read as captioning (image, then text)
      recaption_prob=0.0,  # share of converted pairs read with the model caption that curation wrote
                           # (meta recaption: python -m unimm.data.curate --recaption), not the original
      answer_len=0,        # >0: a document ending in text with loss repeats <eos> until that text and its
                           # <eos>s fill this many tokens (text diffusion: LLaDA / MMaDA pad answers so that
                           # the sampler's answer block of this length learns where the text ends)
      max_error_rate=0.05, # a source whose skipped share of records passes this stops the run
      error_min_records=100,  # ... once this many of its records were read
  )
  c.flow = dict(
      loss_weight=1.0,     # lambda in  ce + lambda * flow
      t_mean=0.0,          # logit-normal t: t = sigmoid(N(t_mean, t_std))
      t_std=1.0,
      shift_kind="constant",  # "constant" (SD3: shift, scaled by resolution) or "flux" (e^mu, mu linear in
                           # the image's tokens from base_shift at 256 to max_shift at 4096)
      shift=1.0,           # constant: time shift at base_image_size; grows with sqrt(pixels / base pixels)
      base_image_size=32,
      base_shift=0.5,      # flux: mu at 256 image tokens
      max_shift=1.15,      # flux: mu at 4096 image tokens
      unshifted_prob=0.0,  # this share of the t draws is left unshifted (a mixture of both densities)
      t_min=0.05,          # clamp of t when converting an x0 prediction to velocity
      max_weight=0.0,      # x0 prediction: cap on the weight 1/t^2 its x0 error gets in the velocity
                           # loss (0: none)
  )
  c.optim = dict(
      lr=3e-3,
      warmup_steps=100,
      final_lr_fraction=0.1,  # cosine decay ends at lr * this
      b1=0.9,
      b2=0.95,
      weight_decay=0.05,
      clip_norm=1.0,
      mu_dtype="float32",  # AdamW first moment: "float32" or "bfloat16" (optax / MaxText mu_dtype)
  )
  c.train = dict(
      steps=1000,
      log_every=50,
      ckpt_every=500,
      keep_ckpts=2,
      time_limit_s=0.0,    # >0: stop (and checkpoint) after this many seconds of training
      max_bad_steps=10,    # stop after this many steps in a row with a non-finite loss (0: never)
  )
  c.mesh = dict(
      data=-1,             # -1 takes the devices the other axes leave
      fsdp=1,
      tensor=1,
      expert=1,
      rules=DEFAULT_RULES,
  )
  c.sample = dict(
      steps=25,            # ODE steps from t=1 to t=0
      solver="euler",      # the MMDiT's ODE solver: "euler" or "heun" (2nd order, two evaluations a step)
      guidance=3.5,        # MMDiT with model.mmdit.guidance_embed (distilled): the embedded guidance scale
      cfg_scale=3.0,       # text guidance (true classifier-free guidance; 1: none)
      image_cfg_scale=1.0, # edits: source-image guidance (InstructPix2Pix two-scale form; 1: none)
      temperature=0.0,     # 0: greedy text decoding
      top_p=0.9,
      max_new_tokens=64,
      image_temperature=1.0,  # vq: sampling temperature of image codes
      image_top_k=0,       # vq: sample codes among the k most likely (0: all)
      mask_steps=12,       # masked / mar: parallel decoding steps (cosine schedule of masked tokens)
      text_steps=0,        # text diffusion: unmasking steps over the answer block (data.answer_len tokens,
                           # the most confident first); 0: one token a step
      text_block=0,        # text diffusion: fill sub-blocks of this many tokens left to right
                           # (semi-autoregressive, LLaDA / MMaDA), text_steps shared among them; 0: one block
  )
  c.grpo = dict(           # python -m unimm.train.grpo: RL on an early-fusion model (unimm.train.grpo)
      prompts=8,           # one-object Shapes prompts per iteration
      group=8,             # images sampled per prompt (advantages normalised within the group)
      temperature=1.0,     # code sampling temperature of the rollouts (and of log pi)
      kl_weight=0.04,      # beta of the k3 KL to the reference
      lr=1e-4,             # AdamW learning rate (constant: no warmup; cosine to optim.final_lr_fraction)
      steps=1000,          # iterations (one rollout and `updates` AdamW steps each)
      updates=1,           # AdamW steps on each rollout (GRPO's mu): the first on-policy, the rest on
                           # PPO's clipped ratio to the rollout's policy
      clip=0.2,            # PPO's ratio clip (epsilon)
      top_blocks=-1,       # >=0: update only the final norm, the output head and the last this many
                           # transformer blocks (the rest stay the reference's); -1: every parameter
      time_limit_s=0.0,    # >0: stop (and checkpoint) after this many seconds
      reward_render="model",  # images the reward reads: "model" (as samples are rendered: by
                              # model.image_decoder where set) or "vq" (the tokenizer's decoder)
  )
  c.eval = dict(
      seed=1234,
      n_single=54,
      n_double=24,
      n_caption=54,
      n_qa=48,
      n_edit=36,
  )
  return c


def tokenizer_defaults() -> ml_collections.ConfigDict:
  """The `tokenizer` section of image-tokenizer configs (`python -m unimm.train.autoencoder`),
  every field with its meaning; saved in a tokenizer workdir's config.json."""
  t = ml_collections.ConfigDict()
  t.kind = "vae"                 # "vae" (KL autoencoder) or "vq" (quantized, see `quantizer`)
  # encoder / decoder (unimm.models.vae layout); downsampling f = 2^(len(block_out_channels) - 1)
  t.block_out_channels = (32, 64)
  t.layers_per_block = 1
  t.latent_channels = 4          # vae: latent channels; vq: decoder input channels
  t.norm_num_groups = 8
  # losses
  t.rec_loss = "l1"              # "l1" or "l2" on images in [-1, 1]
  t.kl_weight = 1e-5             # vae: loss = rec + kl_weight * KL (KL averaged over latent elements)
  t.quantizer_weight = 1.0       # vq: loss = rec + quantizer_weight * quantizer loss
  # quantizer (kind "vq"): the encoder's 2*latent outputs go through a 1x1 conv to the code dim
  t.quantizer = "vq"             # "vq", "fsq" or "lfq"
  t.num_codes = 1024             # vq codebook size
  t.code_dim = 8                 # vq code dim; lfq: bits (2^code_dim codes)
  t.beta = 0.25                  # vq commitment weight
  t.l2_normalize = True          # vq: cosine-distance lookup on l2-normalised codes
  t.ema = True                   # vq: codebook by EMA (not by gradients)
  t.decay = 0.99                 # vq: EMA decay of cluster sizes (and codebook with ema)
  t.dead_code_threshold = 0.1    # vq: codes whose EMA cluster size (codes per batch) is below are
                                 # restarted from this batch's encoder outputs; 0: never
  t.restart_every = 1            # vq: steps between dead-code restarts
  t.fsq_levels = (8, 5, 5, 5)    # fsq: levels per channel (code dim = len, codes = product)
  t.lfq_entropy_weight = 0.1
  t.lfq_commitment_weight = 0.25
  # adversarial loss (taming-transformers VQGAN): PatchGAN discriminator with GroupNorm (no BatchNorm)
  t.disc_weight = 0.0            # generator loss weight (times the adaptive weight); 0: no discriminator
  t.disc_start = 0               # step from which the discriminator trains and its generator loss is added
  t.disc_layers = 2              # stride-2 conv layers of the PatchGAN (taming: 3; 2 suits 32x32 images)
  t.disc_channels = 32           # width of the first discriminator conv (doubling per layer, at most 8x)
  t.disc_norm = "group"          # "group" (GroupNorm) or "none"
  t.disc_loss = "hinge"          # "hinge" or "vanilla" (softplus) discriminator loss
  t.disc_lr = 0.0                # discriminator Adam (b1 0.5, b2 0.9) learning rate; 0: optim.lr
  # perceptual loss: LPIPS-style net read from a local file (layout: unimm.models.perceptual)
  t.perceptual_weight = 0.0      # loss += perceptual_weight * LPIPS(rec, x); 0: off
  t.perceptual_weights = ""      # .safetensors / .npz path of converted LPIPS/VGG weights (never downloaded)
  # evaluation
  t.eval_images = 512            # held-out images
  t.eval_seed = 1234
  return t


def from_saved(saved: dict) -> ml_collections.ConfigDict:
  """A config saved by an earlier run (workdir/config.json) laid over today's defaults,
  so that fields added since then take their default values."""
  cfg = defaults()

  def lay(node, values):
    for k, v in values.items():
      if isinstance(v, dict) and isinstance(node.get(k), ml_collections.ConfigDict) and k != "tasks":
        lay(node[k], v)
      else:
        node[k] = v

  lay(cfg, saved)
  return cfg


def _flat_keys(cfg, prefix=""):
  for k, v in cfg.items():
    path = f"{prefix}{k}"
    yield path
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flat_keys(v, path + ".")


def load_file(path: str) -> ml_collections.ConfigDict:
  """`configs/x.py` or `configs/x.py:arg`; calls the file's `get_config([arg])`."""
  path, _, arg = path.partition(":")
  if not os.path.exists(path):
    raise UserError(f"config file '{path}' does not exist")
  spec = importlib.util.spec_from_file_location("_unimm_config", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  if not hasattr(mod, "get_config"):
    raise UserError(f"config file '{path}' defines no get_config()")
  cfg = mod.get_config(arg) if arg else mod.get_config()
  return ml_collections.ConfigDict(cfg)


def _convert(key: str, raw: str, old):
  if isinstance(old, bool):
    low = raw.lower()
    if low in ("1", "true", "yes"):
      return True
    if low in ("0", "false", "no"):
      return False
    raise UserError(f"--config.{key}={raw}: expected true or false")
  if isinstance(old, str):
    return raw
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    raise UserError(f"--config.{key}={raw}: not a valid {type(old).__name__}") from None
  if isinstance(old, float) and isinstance(value, int):
    value = float(value)
  if isinstance(old, ml_collections.ConfigDict) and isinstance(value, dict):
    return ml_collections.ConfigDict(value)
  if old is not None and not isinstance(value, type(old)) and not (
      isinstance(old, (tuple, list)) and isinstance(value, (tuple, list))):
    raise UserError(f"--config.{key}={raw}: expected a {type(old).__name__}, got {type(value).__name__}")
  return value


def override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets dotted `key` from the string `raw`, typed by the field it replaces."""
  keys = list(_flat_keys(cfg))
  if key not in keys:
    near = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(near)}?" if near else ""
    raise UserError(f"unknown config key '{key}'{hint}")
  *parents, last = key.split(".")
  node = cfg
  for p in parents:
    node = node[p]
  node[last] = _convert(key, raw, node[last])


def parse_args(argv, flags=("workdir",), switches=("resume",), default_config=None):
  """Parses `--config FILE[:arg] --config.a.b=V --FLAG VALUE --SWITCH` style argv.

  Returns (config, {flag: value}); unknown flags fail with a one-line message.
  Without --config, `default_config(opts)` supplies the config (if given).
  """
  cfg_path, overrides = None, []
  opts = {f: None for f in flags} | {s: False for s in switches}
  args = list(argv)
  while args:
    a = args.pop(0)
    name, eq, val = a.partition("=")
    if not name.startswith("--"):
      raise UserError(f"unexpected argument '{a}'")
    name = name[2:]
    if name in switches and not eq:
      opts[name] = True
      continue
    if not eq:
      if not args:
        raise UserError(f"--{name} needs a value")
      val = args.pop(0)
    if name == "config":
      cfg_path = val
    elif name.startswith("config."):
      overrides.append((name[len("config."):], val))
    elif name in flags:
      opts[name] = val
    else:
      known = ["--config", "--config.KEY"] + [f"--{f}" for f in tuple(flags) + tuple(switches)]
      raise UserError(f"unknown flag '--{name}'; known: {' '.join(known)}")
  if cfg_path is not None:
    cfg = load_file(cfg_path)
  elif default_config is not None:
    cfg = default_config(opts)
  else:
    raise UserError("--config FILE is required (e.g. --config configs/demo.py)")
  for key, val in overrides:
    override(cfg, key, val)
  return cfg, opts
