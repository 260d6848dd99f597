"""A 7B dense unified model at pod scale: Llama-2-7B's shape on 256 x 4096-token packed rows.

    python -m unimm.plan --config configs/dense_7b.py --topology v5p-256
    python -m unimm.plan --config configs/dense_7b.py --topology v6e-256

32 blocks of width 4096, 32 heads of 128 (no grouped KV, no QK-norm), SwiGLU 11008, an untied
32,000-token table: 6.74B parameters (Llama-2-7B: 6.74B). 512 px images in 16-pixel patches
(1024 tokens each) in the packed rows. bf16 compute on float32 master weights and Adam state,
blocks scanned, logits and cross-entropy 1024 positions at a time.

Mesh and remat, checked with `python -m unimm.plan` (docs/scaling.md has the figures): all
chips on fsdp (ZeRO-3: parameters, gradients and Adam state sharded 128 / 256 ways; the batch
rows over the same axis), remat "save_dots" (the weight matmuls' outputs kept, the rest
recomputed).
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(width=4096, depth=32, heads=32, kv_heads=32, head_dim=128, mlp_dim=11008,
                 vocab_size=32_000, qk_norm=False, norm_eps=1e-5, rope_theta=10_000.0,
                 image_rope_2d=True, dtype="bfloat16", patch_size=16, scan=True,
                 remat="save_dots", ce_chunk=1024)
  c.data.update(image_size=512, seq_len=4096, batch_size=256)
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)
  return c
