"""HunyuanImage 3.0's shape, scaled down to the demo: every feed-forward a mixture of
routed experts plus a shared expert, trained on the built-in Shapes world on CPU.

    python -m unimm.train --config configs/moe_unified.py --workdir runs/moe_unified

Hunyuan routes each token to 8 of 64 experts (softmax, renormalised top-k) beside one
shared expert; here 2 of 8 experts of FFN width 128 plus a shared one, so a token's
feed-forward has the demo's active width (3 x 128 = 384). On CPU the grouped matmul is
the capacity-padded einsum (jax.lax.ragged_dot is slow on XLA:CPU); overflow beyond
1.5x an even share is dropped and counted (moe_dropped in the log).
"""

import os

from unimm.config import load_file


def get_config():
  c = load_file(os.path.join(os.path.dirname(__file__), "demo.py"))
  c.model.moe.update(experts=8, top_k=2, expert_dim=128, shared_experts=1, router="softmax",
                     renormalize=True, impl="einsum", capacity_factor=1.5,
                     lb_weight=0.01, z_weight=1e-3)
  c.train.time_limit_s = 780.0
  c.flow.update(unshifted_prob=0.0, max_weight=0.0)  # as measured (before the demo's t mixture)
  return c
