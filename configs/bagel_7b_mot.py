"""BAGEL-7B-MoT's shape at full size: a shape config.

A Qwen2.5-7B language model (28 blocks of width 3584, 28 query / 4 key-value heads,
q/k/v biases, FFN 18944, 152,064-token table, RoPE theta 1e6) with QK-norm, duplicated
into an understanding expert (text and condition images) and a generation expert
(generated images) that share one attention: 14.1B parameters, 7.6B active per token
(public: 14B total, 7B active). Instantiated with `jax.eval_shape` on CPU; to start from
the language model, set model.init_from to a local Qwen2.5 directory (the generation
expert is initialised as its copy).

Pod setting (docs/scaling.md, `python -m unimm.plan`): global batch 64 x 16384 tokens
(= 256 x 4096), blocks scanned, remat "full"; the 64 rows split over fsdp 64 and the rest of
the chips go to tensor parallelism (v5p-256: fsdp 64 x tensor 2; v6e-256: fsdp 64 x tensor 4).
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(width=3584, depth=28, heads=28, kv_heads=4, head_dim=128, mlp_dim=18944,
                 vocab_size=152_064, qk_norm=True, qkv_bias=True, tie_embeddings=False,
                 norm_eps=1e-6, rope_theta=1_000_000.0, image_rope_2d=True, dtype="bfloat16")
  c.model.mot.update(route=(0, 0, 1), init_copy=True)
  c.data.update(image_size=512, seq_len=16384, batch_size=64)
  c.model.patch_size = 16
  c.model.update(scan=True, remat="full")
  c.mesh.update(data=1, fsdp=64, tensor=-1, expert=1)
  return c
