"""The dense 1.1B decoder of the train-step benchmark, on 4 x 2048 text tokens.

    python -m unimm.bench --config configs/bench/dense_1b.py --peers

TinyLlama's shape: width 2048, 16 blocks, 32 query / 8 key-value heads of 64, SwiGLU 8192,
an untied 32,000-token table, no QK-norm: 1.10B parameters, the same as its peer,
transformers LlamaForCausalLM. bf16 compute on float32 master weights, the fast levers:
the backend's attention kernel, scanned blocks, logits and cross-entropy 1024 positions of
each row at a time (the float32 [B, L, vocab] logits never exist whole), no remat (the activations of 8192 tokens, about 12 GB, fit one 80-141 GB card; any
recompute is lost time; model.remat="save_dots" is the lever when memory binds).
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(width=2048, depth=16, heads=32, kv_heads=8, head_dim=64, mlp_dim=8192,
                 vocab_size=32_000, qk_norm=False, norm_eps=1e-5, dtype="bfloat16",
                 attention="auto", scan=True, remat="none", ce_chunk=1024)
  c.data.update(seq_len=2048, batch_size=4)
  c.bench = dict(data="synthetic")  # python -m unimm.bench: one random text document per row
  return c
