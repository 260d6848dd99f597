"""Small configs and batches shared by tests."""

from unimm.config import defaults


def tiny_config(**overrides):
  """A model and data config small enough for CPU tests (seconds to compile)."""
  c = defaults()
  c.model.width, c.model.depth, c.model.heads, c.model.mlp_dim = 32, 2, 2, 64
  c.model.patch_size = 8
  c.data.image_size = 16
  c.data.seq_len = 256
  c.data.batch_size = 8
  c.optim.warmup_steps = 2
  c.train.steps = 10
  c.mesh.data = 1
  for k, v in overrides.items():
    node = c
    *parents, last = k.split(".")
    for p in parents:
      node = node[p]
    node[last] = v
  return c
