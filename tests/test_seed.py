"""SEED-LLaMA: the query tokenizer (ViT, causal Q-Former, FSQ) with its MMDiT decoder
(model.condition.encoder="seed"), and the unified model over its codes
(model.image_tokenizer="seed"). Tiny shapes: 16x16 Shapes images, 8x8 patches, 4 queries."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimm.data.pipeline import make_iterator
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.image_grid import unpatchify
from unimm.models.conditioning import gather
from unimm.parallel import sharding as shd
from unimm.train.step import Trainer
from tests.test_mmdit_train import decoder_config
from tests.helpers import quick_compiling_module as _quick_compiles  # noqa: F401 (autouse)


def seed_config(**mesh):
  c = decoder_config(**mesh)
  c.model.condition.update(encoder="seed", depth=2, vit_depth=1, queries=4, levels=(4, 4),
                           recon_weight=0.5)
  return c


@pytest.fixture(scope="module")
def single():
  cfg = seed_config(data=1)
  trainer = Trainer(cfg, shd.make_mesh(cfg.mesh, devices=jax.devices()[:1]),
                    load_tokenizer("byte").model_vocab_size())
  return trainer, trainer.init(), {k: np.asarray(v) for k, v in next(make_iterator(cfg)).items()}


def test_qformer_reads_every_patch_and_the_queries_before(single):
  """Query k's output changes with any patch and with query j <= k, never with a later one (the
  codes' left-to-right order an LLM generates); the patches never read the queries."""
  trainer, state, _ = single
  seed = nnx.merge(trainer.graphdef, state["params"]).seed
  patches = jax.random.uniform(jax.random.key(0), (2, 4, 192), minval=-1, maxval=1)
  base, queries = np.asarray(seed.queries_out(patches)), seed.queries.value
  for j in range(4):
    seed.queries.value = queries.at[j].add(1.0)
    moved = np.abs(np.asarray(seed.queries_out(patches)) - base).max(axis=(0, 2))
    seed.queries.value = queries
    assert np.all(moved[:j] == 0) and np.all(moved[j:] > 1e-4), (j, moved)
  moved = np.abs(np.asarray(seed.queries_out(patches.at[:, 3].set(0.0))) - base).max(axis=(0, 2))
  assert np.all(moved > 1e-4)


def test_decoder_from_codes_is_the_teacher_forced_model(single):
  """Rendering from code ids (what an LLM generates) predicts exactly what training predicts
  from the image the codes were taken from."""
  trainer, state, np_batch = single
  model = nnx.merge(trainer.graphdef, state["params"])
  batch = jax.tree.map(jnp.asarray, np_batch)
  idx, ok = model.target_tokens(batch)
  target = gather(batch["patches"], idx)
  codes = model.seed.codes(target)
  np.testing.assert_allclose(model.seed.embed(codes), model.seed(target), rtol=1e-6, atol=1e-6)
  # the auxiliary reconstruction by hand: the MLP on the codes' values, MSE per row
  values = np.asarray(model.seed.fsq.indices_to_codes(codes)).reshape(len(codes), -1)
  h = values @ np.asarray(model.seed.recon_in.value)
  h = 0.5 * h * (1 + np.tanh(np.sqrt(2 / np.pi) * (h + 0.044715 * h ** 3)))  # gelu (tanh form)
  rec = (h @ np.asarray(model.seed.recon_out.value)).reshape(target.shape)
  rows = np.asarray(ok[:, 0])
  want = np.mean((rec - np.asarray(target)) ** 2, axis=(1, 2))[rows].mean()
  np.testing.assert_allclose(float(model.seed.recon_loss(target, ok[:, 0])), want, rtol=1e-5)
  x_t = jax.random.normal(jax.random.key(1), target.shape)
  t = jnp.linspace(0.1, 0.9, target.shape[0])
  assert rows.sum() >= 4
  np.testing.assert_allclose(np.asarray(model(batch, x_t, t))[rows],
                             np.asarray(model.from_codes(codes, x_t, t))[rows], rtol=1e-5, atol=1e-6)


def test_seed_on_8_devices_equals_one(single):
  trainer, state, np_batch = single
  loss1, grads1 = trainer.loss_and_grads(state["params"], trainer.device_batch(np_batch),
                                         jax.random.key(3))
  cfg = seed_config(data=2, fsdp=2, tensor=2)
  multi = Trainer(cfg, shd.make_mesh(cfg.mesh), trainer.vocab_size)
  params8 = jax.device_put(jax.device_get(state["params"]), multi.param_shardings)
  loss8, grads8 = multi.loss_and_grads(params8, multi.device_batch(np_batch), jax.random.key(3))
  assert abs(float(loss8) - float(loss1)) <= 1e-5 * abs(float(loss1))
  for a, b in zip(jax.tree.leaves(jax.device_get(grads1)), jax.tree.leaves(jax.device_get(grads8))):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert np.max(np.abs(a - b)) <= 1e-5 * max(np.max(np.abs(a)), 1e-30)


def test_llm_reads_and_writes_seed_codes(single, tmp_path):
  """A unified model with model.image_tokenizer="seed": its step encodes each image into the
  tokenizer's codes (those `image_codes` gives for the same pixels), trains on them, and its
  sampler renders generated codes through the tokenizer's MMDiT."""
  from tests.helpers import tiny_config
  from unimm.models.image_tokenizer import QueryCodes, encode_images
  from unimm.sample import load_sampler
  from unimm.sampling.sampler import Sampler
  from unimm.train.loop import Run
  trainer, state, _ = single
  tok_dir = str(tmp_path / "seed_tokenizer")
  run = Run(trainer.cfg, tok_dir, devices=jax.devices()[:1])
  run.ckpt.save(0, state, run.data, force=True)
  run.ckpt.wait()
  with open(os.path.join(tok_dir, "config.json"), "w") as f:
    f.write(trainer.cfg.to_json())
  cfg = tiny_config(**{"data.image_size": 16, "data.seq_len": 96, "data.batch_size": 4,
                       "model.image_tokenizer": "seed", "model.tokenizer_path": tok_dir,
                       "model.image_loss": "next_token"})
  llm = Run(cfg, str(tmp_path / "llm"), devices=jax.devices()[:1])
  tokenizer = llm.trainer.image_tokenizer
  assert isinstance(tokenizer, QueryCodes) and tokenizer.num_patches == 4
  batch = next(llm.data)
  enc = batch["encode"][0] > 0
  assert enc.sum() >= 4
  image = unpatchify(batch["pixels"][0][enc][:4], 8, 2, 2)
  got = jax.device_get(encode_images(tokenizer, tokenizer.variables, jax.tree.map(jnp.asarray, batch)))
  want = load_sampler(tok_dir).image_codes(image[None])[0] + tokenizer.code_offset
  np.testing.assert_array_equal(got["tokens"][0][enc][:4], want)
  llm_state = llm.trainer.init()
  llm_state, m = llm.trainer.step(llm_state, llm.trainer.device_batch(batch), llm.rng)
  assert np.isfinite(float(m["loss"]))
  sampler = Sampler(llm.trainer.graphdef, llm_state["params"], cfg, llm.tokenizer, tokenizer)
  images = sampler.text_to_image(["a red circle"], seed=0)
  assert images.shape == (1, 16, 16, 3) and images.dtype == np.uint8
  # a workdir of another model is refused in one line
  with open(os.path.join(tmp_path, "config.json"), "w") as f:
    json.dump(json.loads(trainer.cfg.to_json()) | {"model": {"family": "unified"}}, f)
  cfg.model.tokenizer_path = str(tmp_path)
  with pytest.raises(UserError, match="holds no query tokenizer") as e:
    Trainer(cfg, shd.make_mesh(cfg.mesh, devices=jax.devices()[:1]), trainer.vocab_size)
  assert "\n" not in str(e.value)


def test_tokenizer_eval_scores_its_round_trip(single, tmp_path):
  """The query tokenizer's eval: ShapesEval's text-to-image parser on the round trip (image ->
  codes -> MMDiT) of each prompt's true image, and a grid of images over reconstructions."""
  from unimm.eval.run import evaluate
  from unimm.sampling.mmdit import DiffusionSampler
  trainer, state, _ = single
  cfg = trainer.cfg.copy_and_resolve_references()
  cfg.eval.update(n_single=3, n_double=2, n_caption=1, n_qa=1, n_edit=1)
  sampler = DiffusionSampler(trainer.graphdef, state["params"], cfg, load_tokenizer("byte"),
                             trainer.image_tokenizer)
  assert sampler.reconstructs and sampler.llm is None
  scores = evaluate(sampler, cfg, str(tmp_path), log=lambda s: None)
  assert "t2i_single/color" in scores and "t2i_double/objects" in scores
  assert not any(k.startswith(("caption/", "edit/", "qa/")) for k in scores)
  assert (tmp_path / "samples.png").exists() and (tmp_path / "eval.json").exists()
