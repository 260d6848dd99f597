"""A 2B FLUX-layout MMDiT of the train-step benchmark: 8 rows of 1024 image + 256 text tokens.

    python -m unimm.bench --config configs/bench/mmdit_2b.py --peers

model.family="mmdit" (`unimm.models.conditioning.DiffusionModel`): FLUX.1's block layout at
a smaller size: 8 double-stream then 16 single-stream blocks, hidden 2048 = 16 heads of 128
(3-axis RoPE over (16, 56, 56) dims), GELU MLPs of 4 x 2048, q/k/v biases, QK RMSNorm, no
guidance embedding. The peer is diffusers FluxTransformer2DModel of the same shape
(`unimm.bench_peers`), trained on random tensors of the same sizes.

Data: one document per row (synthetic, `unimm.bench.synthetic_mmdit_batch`): <bos>, 252
random text ids, <boi>, a noised 256 x 256 image in 8-pixel patches (32 x 32 = 1024 tokens
of 8 x 8 x 3 = 192 values), <eoi>, <eos>: 1280 positions, so the text stream holds L - N =
256 positions, all of them text. The conditioner is the "text" encoder with no blocks
(condition.depth=0): a token table and an RMSNorm, so the MMDiT reads what the peer is given
as precomputed text features (joint_attention_dim = 2048, the model width).

Same work, by choice:
  * pooled_dim 2048 (not FLUX's CLIP 768): unimm's pooled vector is the mean of the
    conditioning features, so it is as wide as they are (2048); the peer gets
    pooled_projection_dim=2048 too, so both embed the same [B, 2048] vector (0 would drop
    the embedder on our side only: diffusers' FLUX always has one).
  * the image stream's in / out projections are 192 wide on both sides (the peer's
    in_channels / out_channels follow our patch vector; FLUX.1's are 64: 16 latent channels
    in 2 x 2 patches): had the peer kept 64, it would lack 2 x 2048 x 128 + 128 of them
    (0.02% of the parameters, 0.03% of the useful FLOPs).
  * model.mmdit.edit="none": no reference images appended to the image stream (the default
    Kontext slot would double it with padding).
What differs: unimm trains the token table (384 x 2048) and the text RMSNorm that make its
context features (0.79M parameters: `params.conditioner`), so its context embedder also
computes the input gradient the peer skips (its features are given); the peer's inputs are
random tensors, ours random ids and patches. Parameters: 2,242,734,272 (`params.total`) =
the peer's 2,241,945,792 + the conditioner's 788,480, with the same matmul weights stream by
stream (tests/test_train_bench.py checks it on a tiny shape), so the same useful FLOPs:
82.07 TFLOP a step (attention 9.4% of it; `unimm.bench`).

Levers: bf16 compute on float32 master weights, the backend's attention kernel ("auto": the
flash kernel on GPU and TPU; cuDNN takes text-only causal rows only, not this all-to-all
mask), scanned blocks (double and single as two units), no remat (the activations of 10,240
tokens fit one 80-141 GB card). model.ce_chunk does nothing here (no LM head).
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(family="mmdit", width=2048, depth=8, heads=16, head_dim=128, qkv_bias=True,
                 qk_norm=True, norm_eps=1e-6, patch_size=8, prediction="velocity",
                 dtype="bfloat16", attention="auto", scan=True, remat="none")
  c.model.mmdit.update(variant="flux", single_depth=16, mlp_ratio=4.0, axes_dims=(16, 56, 56),
                       pooled_dim=2048, guidance_embed=False, edit="none")
  c.model.condition.update(encoder="text", depth=0)
  c.data.update(image_size=256, seq_len=1280, batch_size=8, docs_per_row=1)
  c.data.tasks = dict(t2i=1.0)  # --data pipeline: Shapes text-to-image rows (padded)
  c.bench = dict(data="synthetic")  # python -m unimm.bench: one random text-to-image row each
  return c
