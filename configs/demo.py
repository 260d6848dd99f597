"""The demo: a small unified model trained on the built-in Shapes world on CPU.

    python -m unimm.train --config configs/demo.py --workdir runs/demo
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.train.steps = 3000
  c.train.time_limit_s = 600.0
  return c
