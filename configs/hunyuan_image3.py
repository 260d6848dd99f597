"""HunyuanImage 3.0's shape (its Hunyuan-A13B backbone) at full size: a shape config.

    python -c "from unimm.config import load_file; ..."   # see tests/test_moe_recipes.py

32 blocks of width 4096, 32 query / 8 key-value heads of 128 with QK-norm, every
feed-forward a mixture of 64 routed experts (top-8, FFN 3072) plus one shared expert,
tied 128,167-token table: 80.4B parameters, 12.8B active per token (public: 80B total,
13B active). Instantiated with `jax.eval_shape` on CPU; training it needs a TPU pod
(mesh.expert 8-64) and a VAE-latent image slot.
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(width=4096, depth=32, heads=32, kv_heads=8, head_dim=128, mlp_dim=3072,
                 vocab_size=128_167, qk_norm=True, tie_embeddings=True, norm_eps=1e-5,
                 rope_theta=10_000.0, image_rope_2d=True, dtype="bfloat16")
  c.model.moe.update(experts=64, top_k=8, expert_dim=3072, shared_experts=1, router="softmax",
                     renormalize=True, impl="ragged")
  c.data.update(image_size=1024, seq_len=8192, batch_size=256)
  c.model.patch_size = 16
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=8)
  return c
