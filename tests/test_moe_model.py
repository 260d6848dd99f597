"""The MoE and mixture-of-transformers models inside the unified transformer: expert
parallelism at the level of the whole train loss, routing statistics in the metrics,
modality experts (routing, BAGEL's copy initialisation, LMFusion's frozen text expert),
the full-size shape configs and their one-line errors.

Layer-level MoE checks (kernels, aux formulas, dispatch) are in tests/test_moe.py.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.test_sharding import (  # noqa: F401 (the fixtures vocab_size, np_batch)
    assert_one_line, np_batch, tiny_config, tree_rel_errs, vocab_size)
from unimm.config import load_file
from unimm.data.document import NOISED_IMAGE, TEXT
from unimm.errors import UserError
from unimm.models.unified import build_model, parameter_counts
from unimm.parallel import sharding as shd
from unimm.train.step import Trainer

RTOL = 1e-5
CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


def moe_config(**mesh):
  c = tiny_config(**mesh)
  c.model.moe.update(experts=8, top_k=2, expert_dim=16, shared_experts=1, impl="ragged",
                     capacity_factor=0.0)
  return c


@pytest.fixture(scope="module")
def reference(vocab_size, np_batch):
  c = moe_config(data=1)
  trainer = Trainer(c, shd.make_mesh(c.mesh, devices=jax.devices()[:1]), vocab_size)
  params = trainer.init()["params"]
  batch = trainer.device_batch(np_batch)
  loss, grads = trainer.loss_and_grads(params, batch, jax.random.key(7))
  _, metrics = jax.jit(trainer._loss)(params, batch, jax.random.key(7))
  return jax.device_get(params), float(loss), jax.device_get(grads), jax.device_get(metrics)


# expert parallelism 2, 4 and 8 with data, fsdp and tensor axes (tests/test_moe.py checks more
# meshes on the layer alone)
EP_MESHES = [
    dict(data=2, fsdp=1, tensor=2, expert=2),
    dict(data=1, fsdp=1, tensor=2, expert=4),
    dict(data=1, fsdp=1, tensor=1, expert=8),
]


@pytest.mark.slow
@pytest.mark.parametrize("mesh_axes", EP_MESHES, ids=lambda m: "-".join(f"{k}{v}" for k, v in m.items()))
def test_expert_parallel_loss_and_grads_match_one_device(vocab_size, np_batch, reference, mesh_axes):
  ref_params, ref_loss, ref_grads, ref_metrics = reference
  c = moe_config(**mesh_axes)
  mesh = shd.make_mesh(c.mesh)
  trainer = Trainer(c, mesh, vocab_size)
  params = trainer.init()["params"]
  w = params["blocks"][0]["mlp"]["w_gate"]
  assert w.sharding.spec[0] == "expert"
  assert w.addressable_shards[0].data.shape[0] == 8 // mesh_axes["expert"]
  for name, err in tree_rel_errs(jax.device_get(params), ref_params).items():
    assert err == 0, name
  batch = trainer.device_batch(np_batch)
  loss, grads = trainer.loss_and_grads(params, batch, jax.random.key(7))
  _, metrics = jax.jit(trainer._loss)(params, batch, jax.random.key(7))
  loss_err = abs(float(loss) - ref_loss) / abs(ref_loss)
  errs = tree_rel_errs(jax.device_get(grads), ref_grads)
  worst = max(errs, key=errs.get)
  print(f"\n[{mesh_axes}] loss rel err {loss_err:.2e}; grads max rel err {errs[worst]:.2e} at {worst}")
  assert loss_err < RTOL
  assert not {k: v for k, v in errs.items() if not v < RTOL}
  # dropless: nothing dropped, and the routing statistics are those of the whole batch
  assert float(metrics["moe_dropped"]) == 0.0
  for e in range(8):
    assert abs(float(metrics[f"moe_load/{e}"]) - float(ref_metrics[f"moe_load/{e}"])) < 1e-6
  # the router gets gradients through the load-balancing loss and the weights
  assert float(np.abs(ref_grads["blocks"][0]["mlp"]["router"]).max()) > 0


def test_router_losses_and_statistics_in_the_metrics(reference):
  _, loss, _, m = reference
  load = [float(m[f"moe_load/{e}"]) for e in range(8)]
  assert abs(sum(load) - 1) < 1e-5
  assert float(m["moe_max_load"]) >= max(load) * 8 - 1e-5  # the worst block: >= the average's
  assert float(m["moe_lb"]) >= 1.0 - 1e-5  # E * sum f P >= 1 only approximately; near 1 at init
  assert float(m["moe_z"]) > 0 and 0 < float(m["moe_entropy"]) <= np.log(8) + 1e-5
  # the loss includes the weighted router losses
  c = moe_config()
  task = float(m["loss"]) - c.model.moe.lb_weight * float(m["moe_lb"]) - c.model.moe.z_weight * float(m["moe_z"])
  assert task == pytest.approx(float(m["ce"]) + c.flow.loss_weight * float(m["flow"]), rel=1e-5)
  assert loss == pytest.approx(float(m["loss"]), rel=1e-6)


# ---------------------------------------------------------------- mixture of transformers


def _text_only_batch(vocab_size, n=2, length=12, seed=0):
  rng = np.random.default_rng(seed)
  z = np.zeros((n, length), np.int32)
  return dict(tokens=jnp.asarray(rng.integers(3, 200, (n, length)), jnp.int32),
              modality=jnp.asarray(z), image_ids=jnp.asarray(z), patch_index=jnp.asarray(z),
              segment_ids=jnp.ones((n, length), jnp.int32),
              positions=jnp.asarray(np.tile(np.arange(length), (n, 1)), jnp.int32))


def _forward(model, np_batch):
  b = {k: jnp.asarray(v) for k, v in np_batch.items()}
  t = jnp.where(b["modality"] == NOISED_IMAGE, 0.5, 0.0)
  return model(b["tokens"], b["patches"], t, b["modality"], b["image_ids"], b["patch_index"],
               b["segment_ids"], b["positions"])


def test_mot_copy_init_equals_one_expert(vocab_size, np_batch):
  """BAGEL's initialisation: with the generation expert a copy of the understanding one,
  the model computes what a model routing every token to expert 0 computes."""
  c = tiny_config()
  c.model.mot.update(route=(0, 0, 1), init_copy=True)
  model, _ = build_model(c, vocab_size=vocab_size)
  logits, flow, _ = _forward(model, np_batch)
  for block in model.blocks:
    block.route = (0, 0, 0)
  logits0, flow0, _ = _forward(model, np_batch)
  np.testing.assert_allclose(logits, logits0, rtol=0, atol=1e-6)
  np.testing.assert_allclose(flow, flow0, rtol=0, atol=1e-6)
  state = nnx.state(model.blocks[0], nnx.Param)
  np.testing.assert_array_equal(state["attn"]["wq"].value,
                                state["modality_experts"][0]["attn"]["wq"].value)


def test_mot_routes_by_modality(vocab_size, np_batch):
  """(0, 0, 1): changing the generation expert changes the velocity at generated-image
  positions and nothing at text or condition-image positions (they never see noised
  tokens); changing the understanding expert changes the text logits."""
  c = tiny_config()
  c.model.mot.route = (0, 0, 1)
  model, _ = build_model(c, vocab_size=vocab_size)
  model.flow_head.value = jax.random.normal(jax.random.key(0), model.flow_head.value.shape)  # init 0
  logits, flow, _ = _forward(model, np_batch)
  for block in model.blocks:
    gen = block.modality_experts[0]
    gen.mlp.w_down.value = gen.mlp.w_down.value + 0.5
    gen.attn.wv.value = gen.attn.wv.value * 2.0
  logits2, flow2, _ = _forward(model, np_batch)
  noised = np_batch["modality"] == NOISED_IMAGE
  assert noised.any() and (~noised).any()
  np.testing.assert_array_equal(np.asarray(logits)[~noised], np.asarray(logits2)[~noised])
  assert np.abs(np.asarray(flow)[noised] - np.asarray(flow2)[noised]).max() > 1e-3
  model.blocks[0].attn.wv.value = model.blocks[0].attn.wv.value * 2.0
  logits3, _, _ = _forward(model, np_batch)
  text = np_batch["modality"] == TEXT
  assert np.abs(np.asarray(logits3)[text] - np.asarray(logits2)[text]).max() > 1e-3


def test_frozen_text_expert_does_not_move(vocab_size, np_batch):
  """LMFusion: with model.mot.freeze_text the language model (expert 0, token table, LM
  head, final norm) is bit-identical after training steps; the image side moves."""
  c = tiny_config(data=1)
  c.model.mot.update(route=(0, 1, 1), freeze_text=True, init_copy=True)
  trainer = Trainer(c, shd.make_mesh(c.mesh, devices=jax.devices()[:1]), vocab_size)
  state = trainer.init()
  before = jax.device_get(state["params"])
  batch = trainer.device_batch(np_batch)
  for i in range(2):
    state, _ = trainer.step(state, batch, jax.random.key(i))
  after = jax.device_get(state["params"])
  moved = tree_rel_errs(after, before)
  frozen = [k for k in moved if k.startswith(("['embed']", "['lm_head']", "['final_norm']"))
            or ("['blocks']" in k and "modality_experts" not in k)]
  trained = [k for k in moved if k not in frozen]
  assert frozen and trained
  assert all(moved[k] == 0 for k in frozen), {k: moved[k] for k in frozen if moved[k]}
  assert all(moved[k] > 0 for k in trained if "norm" not in k), \
      {k: moved[k] for k in trained if not moved[k]}


# ---------------------------------------------------------------- full-size shapes and errors


@pytest.mark.parametrize("name,total,active", [
    ("hunyuan_image3.py", 80e9, 13e9),   # Hunyuan-A13B / HunyuanImage 3.0: 80B total, 13B active
    ("bagel_7b_mot.py", 14e9, 7e9),      # BAGEL-7B-MoT: 14B total, 7B active
])
def test_full_size_configs_have_public_parameter_counts(name, total, active):
  c = load_file(os.path.join(CONFIGS, name))
  model = nnx.eval_shape(lambda: build_model(c, vocab_size=1000)[0])
  n_total, n_active = parameter_counts(model, c.model)
  print(f"\n{name}: {n_total / 1e9:.2f}B total, {n_active / 1e9:.2f}B active")
  assert abs(n_total - total) / total < 0.02
  assert abs(n_active - active) / active < 0.1


def test_top_k_larger_than_experts_is_one_line(vocab_size):
  c = tiny_config()
  c.model.moe.update(experts=4, top_k=6)
  with pytest.raises(UserError) as e:
    build_model(c, vocab_size=vocab_size)
  assert_one_line(e, "top_k=6", "experts=4")


def test_experts_not_dividing_the_expert_axis_is_one_line(vocab_size):
  c = tiny_config(data=2, expert=4)
  c.model.moe.update(experts=6, top_k=2)
  with pytest.raises(UserError) as e:
    Trainer(c, shd.make_mesh(c.mesh), vocab_size)
  assert_one_line(e, "model.moe.experts=6", "mesh.expert=4")


@pytest.fixture
def _quick():
  """XLA with most optimisations off (tests/helpers.quick_compiles): these compile more than
  they run."""
  from tests.helpers import quick_compiles  # pylint: disable=import-outside-toplevel
  with quick_compiles():
    yield


@pytest.mark.parametrize("recipe", ["moe_unified.py", "mot.py"])
def test_recipes_train_log_and_sample(recipe, tmp_path, _quick):
  """The two recipes, shrunk: the loss on a fixed batch falls, the train log carries the
  routing statistics, a checkpoint restores, and every sampling mode runs (KV-cached text
  decoding through routed / modality experts)."""
  import json
  from unimm.sample import sampler_from_run
  from unimm.train.loop import Run, routing_report
  c = load_file(os.path.join(CONFIGS, recipe))
  c.model.update(width=32, depth=2, heads=2, mlp_dim=64)
  c.model.moe.expert_dim = min(c.model.moe.expert_dim, 16)
  c.data.update(image_size=16, seq_len=128, batch_size=4)
  c.train.update(steps=3, log_every=3, ckpt_every=3)
  c.optim.warmup_steps = 1
  c.sample.update(steps=2, max_new_tokens=8)
  run = Run(c, str(tmp_path), devices=jax.devices()[:1])
  state = run.trainer.init()
  batch, rng = run.next_batch(), jax.random.key(7)
  before = float(run.trainer.loss_and_grads(state["params"], batch, rng)[0])
  for _ in range(3):
    state, _ = run.trainer.step(state, batch, run.rng)
  after = float(run.trainer.loss_and_grads(state["params"], batch, rng)[0])
  assert np.isfinite(after) and after < before
  state = run.train(run.trainer.init(), log=lambda s: None)
  logged = json.loads(open(tmp_path / "metrics.jsonl").read().splitlines()[-1])
  if c.model.moe.experts:
    assert abs(sum(logged[f"moe_load/{e}"] for e in range(c.model.moe.experts)) - 1) < 1e-4
    assert {"moe_max_load", "moe_dropped", "moe_entropy", "moe_lb", "moe_z"} <= set(logged)
    report = routing_report(run, state, batches=2)
    load = np.asarray(report["load_per_block"])
    assert load.shape == (c.model.depth, c.model.moe.experts)
    np.testing.assert_allclose(load.sum(axis=1), 1.0, atol=1e-3)
    assert report["max_over_mean"] == pytest.approx(max(report["max_over_mean_per_block"]))
    assert all(x >= 1.0 for x in report["max_over_mean_per_block"])
  assert int(run.restore_or_init()["step"]) == 3
  s = sampler_from_run(run, state)
  images = s.text_to_image(["a red circle", "a blue square"])
  assert images.shape == (2, 16, 16, 3)
  assert s.edit(images, ["make it green", "remove it"]).shape == (2, 16, 16, 3)
  assert len(s.image_to_text(images)) == 2
