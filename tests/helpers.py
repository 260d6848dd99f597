"""Small configs and batches shared by tests."""

import contextlib

import pytest

from unimm.config import defaults

# XLA flags of the test processes (tests/conftest.py) and of the CLI runs tests start: they
# compile far more than they run. XLA:CPU's backend optimisations (LLVM) and its MLIR fusion
# emitters cost more compile time than they save (a tiny train step compiles in ~0.65 of the
# time without the emitters, runs ~10% slower).
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


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


def random_unified_ids(seed, batch, length, max_doc=None, image_len=(4, 24), pad_tail=True,
                       bidirectional=0.0):
  """Random packed rows as the pipeline makes them (unimm.batch): documents one after another,
  each a mix of text runs and images (clean or noised, contiguous), then padding (segment 0);
  a `bidirectional` share of the documents with every position 0 (text diffusion).
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
      if bidirectional and rng.random() < bidirectional:
        cols["position"][b, i:i + n] = 0
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


@pytest.fixture(scope="module", autouse=True)
def quick_compiling_module():
  """A module fixture (import it into a test module): XLA with most optimisations off for the
  whole module, whose tiny models spend their time compiling, not running."""
  with quick_compiles():
    yield


def trained_on_one_batch(cfg, workdir, steps=4):
  """A Run on one device after `steps` steps on one batch: (run, state, loss before, loss
  after (the same batch and rng), the batch on the host)."""
  import jax
  from unimm.train.loop import Run
  run = Run(cfg, str(workdir), devices=jax.devices()[:1])
  state = run.trainer.init()
  batch = run.next_batch()
  loss = lambda s: float(run.trainer.loss_and_grads(s["params"], batch, jax.random.key(1))[0])
  before = loss(state)
  for _ in range(steps):
    state, _ = run.trainer.step(state, batch, run.rng)
  return run, state, before, loss(state) if steps else before, jax.device_get(batch)


def assert_8_devices_equal_one(run, state, batch, rtol=1e-5, **model):
  """The loss and gradients of run's config (with `model` fields changed) on data=2, fsdp=2,
  tensor=2 (8 devices) equal those on one device within rtol relative (each gradient leaf
  against its own max)."""
  import jax
  import numpy as np
  from unimm.parallel.sharding import make_mesh
  from unimm.train.step import Trainer
  cfg = run.cfg.copy_and_resolve_references()
  cfg.model.update(**model)
  one = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:1]), run.trainer.vocab_size) if model else run.trainer
  loss1, grads1 = one.loss_and_grads(state["params"], one.device_batch(batch), jax.random.key(5))
  cfg.mesh.update(data=2, fsdp=2, tensor=2)
  multi = Trainer(cfg, make_mesh(cfg.mesh), run.trainer.vocab_size)
  params8 = jax.device_put(jax.device_get(state["params"]), multi.param_shardings)
  assert any(not p.sharding.is_fully_replicated for p in jax.tree.leaves(params8))
  loss8, grads8 = multi.loss_and_grads(params8, multi.device_batch(batch), jax.random.key(5))
  assert abs(float(loss8) - float(loss1)) <= rtol * abs(float(loss1))
  for a, b in zip(jax.tree.leaves(jax.device_get(grads1)), jax.tree.leaves(jax.device_get(grads8))):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= rtol * max(np.max(np.abs(a)), 1e-30)
