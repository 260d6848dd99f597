"""The memory and speed levers are the same model: scan over blocks vs the loop, every remat
policy, chunked vs full cross-entropy, bf16 first moments; for a dense, a routed (dense blocks
between) and a mixture-of-transformers model."""

import jax
import pytest
from flax import nnx

from tests.test_sharding import (  # noqa: F401 (the fixtures vocab_size, np_batch)
    np_batch, tiny_config, tree_rel_errs, vocab_size)
from unimm.models.layers import scan_units
from unimm.models.unified import build_model
from unimm.parallel import sharding as shd
from unimm.train.step import Trainer

RTOL = 1e-5


def model_config(kind, **levers):
  c = tiny_config(data=1)
  if kind == "moe":  # blocks 0 and 2 dense: dense, routed, dense, routed
    c.model.depth = 4
    c.model.moe.update(experts=4, top_k=2, expert_dim=16, shared_experts=1, impl="ragged",
                       dense_layers=(0, 2))
  elif kind == "mot":
    c.model.mot.route = (0, 0, 1)
  c.model.update(levers)
  return c


def loss_and_grads(cfg, vocab_size, np_batch):
  trainer = Trainer(cfg, shd.make_mesh(cfg.mesh, devices=jax.devices()[:1]), vocab_size)
  params = trainer.init()["params"]
  loss, grads = trainer.loss_and_grads(params, trainer.device_batch(np_batch), jax.random.key(3))
  return float(loss), jax.device_get(grads)


_REFERENCE = {}


def reference(kind, vocab_size, np_batch):
  if kind not in _REFERENCE:
    _REFERENCE[kind] = loss_and_grads(model_config(kind), vocab_size, np_batch)
  return _REFERENCE[kind]


# every lever at least once (compiles are the cost: levers combined), scan on every kind;
# np_batch rows are 64 positions, so chunks of 16 and 32
CASES = [
    ("dense", dict(scan=True, remat="save_dots", ce_chunk=16)),
    ("dense", dict(remat="offload")),
    ("moe", dict(scan=True, remat="full", ce_chunk=16)),
    ("mot", dict(scan=True, remat="offload", ce_chunk=32)),
]


@pytest.mark.parametrize("kind,levers", CASES,
                         ids=[k + "-" + "-".join(f"{a}={b}" for a, b in lv.items()) for k, lv in CASES])
def test_levers_give_the_same_loss_and_gradients(kind, levers, vocab_size, np_batch):
  ref_loss, ref_grads = reference(kind, vocab_size, np_batch)
  loss, grads = loss_and_grads(model_config(kind, **levers), vocab_size, np_batch)
  assert abs(loss - ref_loss) <= RTOL * abs(ref_loss)
  errs = tree_rel_errs(grads, ref_grads)
  print(f"{kind} {levers}: loss rel. err {abs(loss - ref_loss) / abs(ref_loss):.1e}, worst "
        f"gradient leaf {max(errs.values()):.1e}")
  assert not {k: v for k, v in errs.items() if not v <= RTOL}, max(errs.values())


def test_scan_units_group_repeated_blocks():
  def units(kind, **fields):
    c = model_config(kind)
    c.model.moe.update(fields.pop("moe", {}))
    c.model.update(fields)
    model = nnx.eval_shape(lambda: build_model(c, vocab_size=256)[0])
    return scan_units(model.blocks)

  assert units("dense", depth=4) == [(0, 1, 4)]
  assert units("moe") == [(0, 2, 2)]  # dense-routed twice
  assert units("moe", depth=5) == [(0, 2, 2), (4, 1, 1)]  # then one routed
  assert units("moe", depth=6, moe={"dense_layers": (0, 1)}) == [(0, 1, 2), (2, 1, 4)]
  assert units("mot", depth=1) == [(0, 1, 1)]


def test_bf16_first_moment_is_stored_in_bf16(vocab_size):
  c = model_config("dense")
  c.optim.mu_dtype = "bfloat16"
  trainer = Trainer(c, shd.make_mesh(c.mesh, devices=jax.devices()[:1]), vocab_size)
  adam = trainer.abstract_state["opt_state"][1][0]
  assert {x.dtype.name for x in jax.tree.leaves(adam.mu)} == {"bfloat16"}
  assert {x.dtype.name for x in jax.tree.leaves(adam.nu)} == {"float32"}
