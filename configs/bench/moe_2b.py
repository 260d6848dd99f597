"""The 2.1B mixture-of-experts decoder of the train-step benchmark, on 4 x 2048 text tokens.

    python -m unimm.bench --config configs/bench/moe_2b.py --peers

Width 2048, 12 blocks, 32 query / 8 key-value heads of 64 with QK-norm, every feed-forward
32 routed experts of SwiGLU 768, top-4 (softmax router, renormalised, no shared expert), an
untied 32,000-token table: 2.08B parameters, 0.49B active per token; the peer is
transformers Qwen3MoeForCausalLM of the same shape. The grouped matmul is the backend's
("auto"), dropless; the levers as in dense_1b.py.
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(width=2048, depth=12, heads=32, kv_heads=8, head_dim=64, mlp_dim=768,
                 vocab_size=32_000, qk_norm=True, norm_eps=1e-6, dtype="bfloat16",
                 attention="auto", scan=True, remat="none", ce_chunk=1024)
  c.model.moe.update(experts=32, top_k=4, expert_dim=768, shared_experts=0, router="softmax",
                     renormalize=True, impl="auto", capacity_factor=0.0)
  c.data.update(seq_len=2048, batch_size=4)
  c.bench = dict(data="synthetic")  # python -m unimm.bench: one random text document per row
  return c
