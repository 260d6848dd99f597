"""Small configs and batches shared by tests."""

import contextlib

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


def random_unified_ids(seed, batch, length, max_doc=None, image_len=(4, 24), pad_tail=True):
  """Random packed rows as the pipeline makes them (unimm.batch): documents one after another,
  each a mix of text runs and images (clean or noised, contiguous), then padding (segment 0).
  Returns a MaskIds of int32 numpy arrays [batch, length]."""
  import numpy as np
  from unimm.batch import CLEAN_IMAGE, NOISED_IMAGE, TEXT
  from unimm.kernels.mask import MaskIds
  rng = np.random.default_rng(seed)
  max_doc = max_doc or length // 2
  cols = {k: np.zeros((batch, length), np.int32) for k in MaskIds._fields}
  for b in range(batch):
    i, seg = 0, 0
    end = length - (int(rng.integers(0, length // 4)) if pad_tail else 0)
    while i < end:
      seg += 1
      n = min(int(rng.integers(1, max_doc + 1)), end - i)
      pos, image = 0, 0
      while pos < n:
        if rng.random() < 0.5:  # an image run
          image += 1
          m = min(int(rng.integers(*image_len)), n - pos)
          cols["modality"][b, i + pos:i + pos + m] = NOISED_IMAGE if rng.random() < 0.5 else CLEAN_IMAGE
          cols["image"][b, i + pos:i + pos + m] = image
        else:
          m = min(int(rng.integers(1, 12)), n - pos)
          cols["modality"][b, i + pos:i + pos + m] = TEXT
        pos += m
      cols["segment"][b, i:i + n] = seg
      cols["position"][b, i:i + n] = np.arange(n)
      i += n
  return MaskIds(**cols)


@contextlib.contextmanager
def quick_compiles():
  """XLA with most optimisations off: tiny training steps that run a few times compile about
  2.5x faster (compiling, not running, is what such tests spend)."""
  import jax
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", old)
