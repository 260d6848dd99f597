"""HunyuanImage 3.0's shape (its Hunyuan-A13B backbone) at full size: a shape config.

    python -c "from unimm.config import load_file; ..."   # see tests/test_moe_recipes.py

32 blocks of width 4096, 32 query / 8 key-value heads of 128 with QK-norm, every
feed-forward a mixture of 64 routed experts (top-8, FFN 3072) plus one shared expert,
tied 128,167-token table: 80.4B parameters, 12.8B active per token (public: 80B total,
13B active). Instantiated with `jax.eval_shape` on CPU; training it needs a TPU pod and a
VAE-latent image slot.

Pod setting (docs/scaling.md, `python -m unimm.plan`): global batch 256 x 4096 tokens (was
256 x 8192, which does not fit v6e-256 with this MoE path), blocks
scanned, remat "full" (each block keeps only its input), mesh fsdp over the rest x expert 4
(v6e-256: fsdp 64 x expert 4, 4096 tokens a chip; v5p-256: fsdp 32 x expert 4, 8192 a chip).
Expert parallelism is kept at 4, not 8: the dropless ragged all-to-all sizes its receive
buffer for the worst case, ep * tokens * min(top_k, experts / ep) rows a chip, which is
64 x tokens for any ep >= 8 here and halves with each halving of ep below it.
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(width=4096, depth=32, heads=32, kv_heads=8, head_dim=128, mlp_dim=3072,
                 vocab_size=128_167, qk_norm=True, tie_embeddings=True, norm_eps=1e-5,
                 rope_theta=10_000.0, image_rope_2d=True, dtype="bfloat16")
  c.model.moe.update(experts=64, top_k=8, expert_dim=3072, shared_experts=1, router="softmax",
                     renormalize=True, impl="ragged")
  c.data.update(image_size=1024, seq_len=4096, batch_size=256)
  c.model.patch_size = 16
  c.model.update(scan=True, remat="full")
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=4)
  return c
