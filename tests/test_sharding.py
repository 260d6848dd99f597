"""Sharded training matches single-device training; mesh/config errors are one-line.

`tests/conftest.py` gives JAX 8 fake CPU devices. The model is tiny (width 32,
depth 2) and the data restricted to short tasks so that every document fits
data.seq_len=64, which keeps compilation and the steps fast.
"""

import jax
import numpy as np
import pytest

from unimm.config import defaults
from unimm.data.pipeline import make_iterator
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.parallel import sharding as shd
from unimm.train.loop import check_batch_fits_mesh
from unimm.train.step import Trainer

RTOL = 1e-5
# Params after one AdamW step. The first update is lr * g / (|g| + eps) with
# eps = 1e-8: for clipped gradient entries of order eps, float-rounding
# differences between the meshes (~1e-7 of the leaf, far inside RTOL for the
# gradients) become update differences of up to a few percent of lr. 1e-4 of
# params of magnitude ~0.3 is ~1% of lr = 3e-3, while one wrong update (a sign
# flip, a missing gradient reduction) moves an entry by ~lr, i.e. ~1e-2 relative.
STEP_RTOL = 1e-4


def tiny_config(**mesh):
  c = defaults()
  c.model.update(width=32, depth=2, heads=2, mlp_dim=64, patch_size=8)
  # image_size 16 is Shapes' minimum; with one object per image, t2i / qa / edit
  # documents need at most 56 positions, so they all fit seq_len 64.
  c.data.update(image_size=16, seq_len=64, batch_size=8, two_object_prob=0.0)
  c.data.tasks = dict(t2i=1.0, qa=1.0, edit=1.0)
  c.optim.warmup_steps = 0  # lr(0) = peak, so the first step moves the params
  c.train.steps = 10
  c.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)
  c.mesh.update(**mesh)
  return c


@pytest.fixture(scope="module")
def vocab_size():
  return load_tokenizer("byte").model_vocab_size()


@pytest.fixture(scope="module")
def np_batch():
  """One fixed host batch (numpy arrays), shared by every mesh."""
  it = make_iterator(tiny_config())
  batch = next(it)
  assert batch["tokens"].shape == (8, 64)
  assert (batch["modality"] != 0).any(), "the batch should hold image positions"
  return {k: np.asarray(v) for k, v in batch.items()}


_TRAINERS = {}  # one Trainer (and its compiled functions) per mesh, shared by the tests


def single_device_trainer(vocab_size):
  if "single" not in _TRAINERS:
    cfg = tiny_config(data=1)
    mesh = shd.make_mesh(cfg.mesh, devices=jax.devices()[:1])
    assert mesh.size == 1
    _TRAINERS["single"] = Trainer(cfg, mesh, vocab_size)
  return _TRAINERS["single"]


def multi_device_trainer(vocab_size, mesh_axes):
  key = tuple(sorted(mesh_axes.items()))
  if key not in _TRAINERS:
    cfg = tiny_config(**mesh_axes)
    assert len(jax.devices()) == 8, "conftest.py should give 8 fake CPU devices"
    mesh = shd.make_mesh(cfg.mesh)
    assert dict(mesh.shape) == mesh_axes
    _TRAINERS[key] = Trainer(cfg, mesh, vocab_size)
  return _TRAINERS[key]


def leaf_rel_err(a, b):
  """max|a - b| / max|b| over one array (0 when both are exactly zero)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  diff, ref = np.max(np.abs(a - b)), np.max(np.abs(b))
  if ref == 0:
    return 0.0 if diff == 0 else np.inf
  return diff / ref


def tree_rel_errs(tree_a, tree_b):
  """{leaf path: relative error} over two trees of the same structure."""
  flat_a, def_a = jax.tree_util.tree_flatten_with_path(tree_a)
  flat_b, def_b = jax.tree_util.tree_flatten_with_path(tree_b)
  assert def_a == def_b
  return {jax.tree_util.keystr(p): leaf_rel_err(a, b)
          for (p, a), (_, b) in zip(flat_a, flat_b)}


MESHES = [
    dict(data=2, fsdp=2, tensor=2, expert=1),
    dict(data=2, fsdp=1, tensor=2, expert=2),  # expert acts as a batch axis (dense model)
]
MESH_IDS = ["data2-fsdp2-tensor2", "data2-tensor2-expert2"]


@pytest.fixture(scope="module")
def reference_loss_and_grads(vocab_size, np_batch):
  trainer = single_device_trainer(vocab_size)
  params = trainer.init()["params"]
  loss, grads = trainer.loss_and_grads(params, trainer.device_batch(np_batch),
                                       jax.random.key(7))
  return jax.device_get(params), float(loss), jax.device_get(grads)


@pytest.mark.parametrize("mesh_axes", MESHES, ids=MESH_IDS)
def test_loss_and_grads_match_single_device(vocab_size, np_batch, reference_loss_and_grads,
                                            mesh_axes):
  ref_params, ref_loss, ref_grads = reference_loss_and_grads
  trainer = multi_device_trainer(vocab_size, mesh_axes)
  params = trainer.init()["params"]
  batch = trainer.device_batch(np_batch)

  # The 8-device run is really sharded: parameters over fsdp/tensor, the batch
  # over every batch axis (data x fsdp x expert = 4 shards of 2 rows).
  param_shardings = [p.sharding for p in jax.tree.leaves(params)]
  assert any(not s.is_fully_replicated for s in param_shardings)
  wq = params["blocks"][0]["attn"]["wq"]
  assert wq.sharding.spec[1] == "tensor"
  assert wq.addressable_shards[0].data.shape == (32 // mesh_axes["fsdp"], 1, 16)
  tokens = batch["tokens"]
  batch_axes = tokens.sharding.spec[0]
  assert set(a for a, n in mesh_axes.items() if n > 1 and a != "tensor") <= set(batch_axes)
  assert {s.data.shape for s in tokens.addressable_shards} == {(2, 64)}
  assert len(tokens.sharding.device_set) == 8

  # Same seed, same parameters, whatever the mesh.
  for name, err in tree_rel_errs(jax.device_get(params), ref_params).items():
    assert err == 0, f"init differs on the sharded mesh at {name}: {err}"

  loss, grads = trainer.loss_and_grads(params, batch, jax.random.key(7))
  loss = float(loss)
  loss_err = abs(loss - ref_loss) / abs(ref_loss)
  errs = tree_rel_errs(jax.device_get(grads), ref_grads)
  worst = max(errs, key=errs.get)
  print(f"\n[{mesh_axes}] loss {loss:.6f} vs {ref_loss:.6f}: rel err {loss_err:.2e}; "
        f"grads max rel err {errs[worst]:.2e} at {worst}")
  assert loss_err < RTOL
  assert np.isfinite(ref_loss) and ref_loss > 0
  bad = {k: v for k, v in errs.items() if not v < RTOL}
  assert not bad, f"gradient leaves off by more than {RTOL} relative: {bad}"
  # The gradients are not trivially zero (the comparison means something).
  assert sum(float(np.abs(g).max()) > 0 for g in jax.tree.leaves(ref_grads)) >= 0.9 * len(errs)


def test_one_train_step_matches_single_device(vocab_size, np_batch):
  rng = jax.random.key(3)
  results = []
  for trainer in (single_device_trainer(vocab_size),
                  multi_device_trainer(vocab_size, MESHES[0])):
    state = trainer.init()
    init_params = jax.device_get(state["params"])
    state, metrics = trainer.step(state, trainer.device_batch(np_batch), rng)
    assert int(state["step"]) == 1
    assert float(metrics["lr"]) > 0
    results.append((init_params, jax.device_get(state["params"]), jax.device_get(metrics)))
  (init_ref, ref, m_ref), (_, got, m_got) = results

  # The step moved every parameter leaf (otherwise equality would be vacuous).
  moved = tree_rel_errs(ref, init_ref)
  assert all(v > 0 for v in moved.values()), moved
  errs = tree_rel_errs(got, ref)
  worst = max(errs, key=errs.get)
  print(f"\nparams after one step: max rel err {errs[worst]:.2e} at {worst}; "
        f"loss {float(m_got['loss']):.6f} vs {float(m_ref['loss']):.6f}")
  bad = {k: v for k, v in errs.items() if not v < STEP_RTOL}
  assert not bad, f"parameter leaves off by more than {STEP_RTOL} relative after one step: {bad}"
  assert abs(float(m_got["loss"]) - float(m_ref["loss"])) <= RTOL * abs(float(m_ref["loss"]))


# ---------------------------------------------------------------- errors


def assert_one_line(excinfo, *words):
  msg = str(excinfo.value)
  assert excinfo.type is UserError, f"{excinfo.type.__name__}: {msg}"
  assert "\n" not in msg, msg
  for w in words:
    assert w in msg, f"{w!r} not in {msg!r}"
  return msg


def test_mesh_product_must_equal_device_count():
  cfg = tiny_config(data=3, fsdp=1, tensor=1, expert=1)
  with pytest.raises(UserError) as e:
    shd.make_mesh(cfg.mesh)
  assert_one_line(e, "8", "mesh.data")


def test_mesh_fixed_axes_must_divide_device_count():
  cfg = tiny_config(data=-1, fsdp=3)
  with pytest.raises(UserError) as e:
    shd.make_mesh(cfg.mesh)
  assert_one_line(e, "8 devices", "3")


def test_mesh_only_one_axis_may_be_minus_one():
  cfg = tiny_config(data=-1, fsdp=-1)
  with pytest.raises(UserError) as e:
    shd.make_mesh(cfg.mesh)
  assert_one_line(e, "-1", "data", "fsdp")


def test_mesh_sizes_must_be_positive():
  cfg = tiny_config(data=8, tensor=0)
  with pytest.raises(UserError) as e:
    shd.make_mesh(cfg.mesh)
  assert_one_line(e, "mesh.tensor=0")


def test_heads_must_divide_over_tensor(vocab_size):
  cfg = tiny_config(data=2, tensor=4)  # heads=2 cannot split over tensor=4
  mesh = shd.make_mesh(cfg.mesh)
  with pytest.raises(UserError) as e:
    Trainer(cfg, mesh, vocab_size)
  assert_one_line(e, "heads", "tensor", "attn")


def test_width_must_divide_over_fsdp(vocab_size):
  cfg = tiny_config(data=1, fsdp=8)
  cfg.model.update(width=36, heads=2)  # embed=36 cannot split over fsdp=8
  mesh = shd.make_mesh(cfg.mesh)
  with pytest.raises(UserError) as e:
    Trainer(cfg, mesh, vocab_size)
  assert_one_line(e, "36", "fsdp", "embed")


def test_width_must_be_multiple_of_heads(vocab_size):
  cfg = tiny_config(data=8)
  cfg.model.heads = 3
  mesh = shd.make_mesh(cfg.mesh)
  with pytest.raises(UserError) as e:
    Trainer(cfg, mesh, vocab_size)
  assert_one_line(e, "model.width=32", "model.heads=3")


@pytest.mark.parametrize("batch_size,mesh_axes", [
    (6, dict(data=4, fsdp=2)),
    (8, dict(data=1, fsdp=2, tensor=1, expert=4)),  # ok: 8 over 2 x 4
    (4, dict(data=2, fsdp=1, tensor=1, expert=4)),  # expert counts as a batch axis
])
def test_batch_must_divide_over_batch_axes(batch_size, mesh_axes):
  cfg = tiny_config(**mesh_axes)
  cfg.data.batch_size = batch_size
  mesh = shd.make_mesh(cfg.mesh)
  n = mesh.shape["data"] * mesh.shape["fsdp"] * mesh.shape["expert"]
  if batch_size % n == 0:
    check_batch_fits_mesh(cfg, mesh)
    return
  with pytest.raises(UserError) as e:
    check_batch_fits_mesh(cfg, mesh)
  assert_one_line(e, f"data.batch_size={batch_size}", f"multiple of {n}")


def test_logical_axis_without_rule(vocab_size):
  cfg = tiny_config(data=8)
  # A typo in the rules table: the model's "embed" axis is left without a rule.
  cfg.mesh.rules = tuple(("embd", t) if name == "embed" else (name, t)
                         for name, t in cfg.mesh.rules)
  mesh = shd.make_mesh(cfg.mesh)
  with pytest.raises(UserError) as e:
    Trainer(cfg, mesh, vocab_size)
  assert_one_line(e, "'embed'", "mesh.rules")
  with pytest.raises(UserError) as e:
    shd.logical_to_spec(("batch", "no_such_axis"), cfg.mesh.rules)
  assert_one_line(e, "'no_such_axis'", "mesh.rules")


def test_rule_naming_unknown_mesh_axis(vocab_size):
  cfg = tiny_config(data=8)
  cfg.mesh.rules = tuple((name, "fsdpp") if name == "embed" else (name, t)
                         for name, t in cfg.mesh.rules)
  mesh = shd.make_mesh(cfg.mesh)
  with pytest.raises(UserError) as e:
    Trainer(cfg, mesh, vocab_size)
  assert_one_line(e, "'fsdpp'", "mesh.rules")
