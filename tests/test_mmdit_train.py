"""Training and sampling the MMDiT (model.family="mmdit", unimm.models.conditioning) on the batch
contract, and the edit alignment the unified model shares: the aligned source of an edit target,
three-way condition dropout, 8 fake devices against one, the frozen LLM of MetaQuery, the
one-line errors. Tiny shapes: 16x16 Shapes images in 8x8 patches (4 image tokens)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unimm.batch import CLEAN_IMAGE, NOISED_IMAGE, TEXT
from unimm.config import defaults
from unimm.data import document as D
from unimm.data.pipeline import condition_dropout, make_iterator
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.kernels.mask import aligned_source
from unimm.parallel import sharding as shd
from unimm.train.step import Trainer
from tests.helpers import quick_compiling_module as _quick_compiles  # noqa: F401 (autouse)

RTOL = 1e-5


def mmdit_config(**mesh):
  c = defaults()
  c.model.update(family="mmdit", width=32, depth=1, heads=2, head_dim=16, qkv_bias=True,
                 patch_size=8, prediction="x0")
  c.model.mmdit.update(variant="flux", single_depth=1, axes_dims=(4, 6, 6), pooled_dim=32,
                       edit="concat")
  c.model.condition.update(encoder="text", depth=1)
  c.data.update(image_size=16, seq_len=64, batch_size=8, docs_per_row=1, two_object_prob=0.0,
                image_dropout=0.1)
  c.data.tasks = dict(t2i=1.0, edit=1.0)
  c.optim.warmup_steps = 0
  c.train.steps = 10
  c.sample.update(steps=2, cfg_scale=2.0, image_cfg_scale=1.5)
  c.mesh.update(data=-1, fsdp=1, tensor=1, expert=1)
  c.mesh.update(**mesh)
  return c


def decoder_config(**mesh):
  """mmdit_config for a decoder conditioned on its target's codes (SEED's, X-Omni's): text to
  image only, no condition dropout, no guidance."""
  c = mmdit_config(**mesh)
  c.model.mmdit.edit = "none"
  c.data.update(cfg_dropout=0.0, image_dropout=0.0)
  c.data.tasks = dict(t2i=1.0)
  c.sample.update(cfg_scale=1.0, image_cfg_scale=1.0)
  return c


@pytest.fixture(scope="module")
def vocab_size():
  return load_tokenizer("byte").model_vocab_size()


@pytest.fixture(scope="module")
def np_batch():
  batch = next(make_iterator(mmdit_config()))
  assert batch["segment_ids"].max() == 1, "one document per row"
  assert (batch["modality"] == NOISED_IMAGE).any() and (batch["modality"] == CLEAN_IMAGE).any()
  return {k: np.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def single(vocab_size):
  cfg = mmdit_config(data=1)
  return Trainer(cfg, shd.make_mesh(cfg.mesh, devices=jax.devices()[:1]), vocab_size)


def test_aligned_source_finds_the_same_place_of_the_last_condition_image():
  # one row: [text, source image (3 tokens), text, target (3 tokens), text | next doc: text,
  # target without a source | padding]
  modality = [TEXT, 1, 1, 1, TEXT, 2, 2, 2, TEXT, TEXT, 2, 2, 0]
  image = [0, 1, 1, 1, 0, 2, 2, 2, 0, 0, 1, 1, 0]
  segment = [1] * 9 + [2, 2, 2, 0]
  src, ok = aligned_source(*(jnp.asarray([x], jnp.int32) for x in (segment, modality, image)))
  assert np.asarray(ok)[0].tolist() == [False] * 5 + [True] * 3 + [False] * 5
  assert np.asarray(src)[0, 5:8].tolist() == [1, 2, 3]
  # a source of another size is never used
  modality2 = [TEXT, 1, 1, TEXT, 2, 2, 2]
  image2, segment2 = [0, 1, 1, 0, 2, 2, 2], [1] * 7
  _, ok2 = aligned_source(*(jnp.asarray([x], jnp.int32) for x in (segment2, modality2, image2)))
  assert not np.asarray(ok2).any()


def test_three_way_condition_dropout():
  img = np.zeros((16, 16, 3), np.uint8)
  doc = D.document("edit", [D.image(img), D.text("make it red"), D.image(img, "target")])
  kinds = {"both": 0, "text": 0, "image": 0, "none": 0}
  for k in range(2000):
    out = condition_dropout(doc, np.random.default_rng(k), 0.2, 0.3)
    text = any(s["kind"] == "text" for s in out["segments"])
    image = len(out["segments"]) > 1 and out["segments"][0]["kind"] == "image"
    kinds[{(False, False): "both", (False, True): "text", (True, False): "image",
           (True, True): "none"}[(text, image)]] += 1
    assert out["segments"][-1]["role"] == "target"
  # independent draws: text dropped 20%, image 30%, both 6%
  assert abs(kinds["text"] / 2000 - 0.2 * 0.7) < 0.03
  assert abs(kinds["image"] / 2000 - 0.8 * 0.3) < 0.03
  assert abs(kinds["both"] / 2000 - 0.06) < 0.02
  # p_image = 0 draws once, as before (same decisions as the text-only dropout)
  for k in range(20):
    a = condition_dropout(doc, np.random.default_rng(k), 0.5)
    b = condition_dropout(doc, np.random.default_rng(k), 0.5, 0.0)
    assert a == b


def test_edit_source_reaches_the_edit_target(vocab_size):
  """model.edit_source: a noised target token's input embeds the clean patch at its place in
  the source image, nothing else does; "residual": the x0 prediction starts from that patch."""
  from unimm.models.unified import build_model
  c = defaults()
  c.model.update(width=32, depth=1, heads=2, mlp_dim=64, patch_size=8, edit_source="residual")
  c.data.update(image_size=16)
  model, _ = build_model(c, vocab_size=vocab_size)
  B, L, Dp = 1, 12, 192
  modality = jnp.asarray([[0, 1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 0]])
  image = jnp.asarray([[0, 1, 1, 1, 1, 0, 2, 2, 2, 2, 0, 0]])
  seg = jnp.asarray([[1] * 11 + [0]])
  pidx = jnp.asarray([[0, 0, 1, 2, 3, 0, 0, 1, 2, 3, 0, 0]])
  patches = jax.random.normal(jax.random.key(0), (B, L, Dp))
  t = jnp.zeros((B, L))
  embed = lambda p: model.embed_inputs(jnp.zeros((B, L), jnp.int32), p, t, modality, pidx, seg, image)
  base = embed(patches)
  moved = embed(patches.at[0, 3].add(1.0))  # source patch 2 changes: only target token 2 moves
  changed = np.nonzero(np.abs(np.asarray(moved - base)).max(-1)[0] > 0)[0].tolist()
  assert changed == [3, 8]
  # the flow head starts at zero: the prediction is the source at the targets, 0 elsewhere
  _, flow, _ = model(jnp.zeros((B, L), jnp.int32), patches, t, modality, image, pidx, seg,
                     jnp.arange(L)[None])
  np.testing.assert_allclose(np.asarray(flow[0, 6:10]), np.asarray(patches[0, 1:5]), atol=1e-6)
  assert not np.asarray(flow[0, :6]).any() and not np.asarray(flow[0, 10:]).any()
  c.model.prediction = "velocity"
  with pytest.raises(UserError, match="needs model.prediction='x0'"):
    build_model(c, vocab_size=vocab_size)


def test_text_len_reads_the_first_text_tokens_and_counts_the_rows_it_cuts(vocab_size, np_batch):
  """model.condition.text_len: a text stream as long as the longest text predicts what the
  full-row stream does; a shorter one reads each row's first text tokens and counts the rows
  whose text it cuts."""
  from unimm.train.step import build_model
  batch = jax.tree.map(jnp.asarray, np_batch)
  text = np_batch["modality"] == TEXT
  counts = (text & (np_batch["segment_ids"] > 0)).sum(1)
  idx = np.nonzero(np_batch["modality"][0] == NOISED_IMAGE)[0]
  x_t = jax.random.normal(jax.random.key(1), (len(counts), len(idx), np_batch["patches"].shape[-1]))
  t = jnp.linspace(0.2, 0.9, len(counts))
  out = {}
  for n in (0, int(counts.max()), int(np.median(counts))):
    cfg = mmdit_config(data=1)
    cfg.model.condition.text_len = n
    model, _ = build_model(cfg, vocab_size, seed=0)
    out[n] = (np.asarray(model(batch, x_t, t)), model.row_counts(batch),
              np.asarray(model.text_positions(batch)[0]))
  full, longest, short = out[0], out[int(counts.max())], out[int(np.median(counts))]
  np.testing.assert_allclose(longest[0], full[0], rtol=1e-5, atol=1e-6)
  assert int(full[1]["text_cut"]) == int(longest[1]["text_cut"]) == 0
  k = short[2].shape[1]
  assert int(short[1]["text_cut"]) == int((counts > k).sum()) > 0
  for row, first in zip(text & (np_batch["segment_ids"] > 0), short[2]):
    assert first[:min(k, row.sum())].tolist() == np.nonzero(row)[0][:k].tolist()


def test_mmdit_on_8_devices_equals_one(vocab_size, np_batch, single):
  params = single.init()["params"]
  loss1, grads1 = single.loss_and_grads(params, single.device_batch(np_batch), jax.random.key(3))
  cfg = mmdit_config(data=2, fsdp=2, tensor=2)
  multi = Trainer(cfg, shd.make_mesh(cfg.mesh), vocab_size)
  params8 = multi.init()["params"]
  assert any(not p.sharding.is_fully_replicated for p in jax.tree.leaves(params8))
  loss8, grads8 = multi.loss_and_grads(params8, multi.device_batch(np_batch), jax.random.key(3))
  assert abs(float(loss8) - float(loss1)) <= RTOL * abs(float(loss1))
  g1, g8 = jax.device_get(grads1), jax.device_get(grads8)
  for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g8)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30)
    assert err <= RTOL, f"{jax.tree_util.keystr(path)}: {err}"


def test_mmdit_step_learns_and_samples(vocab_size, np_batch, single, tmp_path):
  from unimm.sampling.mmdit import DiffusionSampler
  state = single.init()
  batch = single.device_batch(np_batch)
  losses = []
  for _ in range(4):  # the same batch: the loss goes down
    state, m = single.step(state, batch, jax.random.key(0))
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0], losses
  assert float(m["edit_rows"]) > 0 and float(m["edit_unaligned"]) == 0
  cfg = single.cfg.copy_and_resolve_references()
  cfg.sample.solver = "heun"
  sampler = DiffusionSampler(single.graphdef, state["params"], cfg, load_tokenizer("byte"),
                             single.image_tokenizer)
  images = sampler.text_to_image(["a red circle", "a blue square"], seed=1)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  edited = sampler.edit(list(images), ["make the circle green", "remove the square"])
  assert edited.shape == (2, 16, 16, 3)
  assert sampler.llm is None


def test_mmdit_config_errors(vocab_size):
  for key, value, words in (("model.condition.encoder", "clip", "model.condition.encoder='clip'"),
                            ("model.mmdit.edit", "overlay", "model.mmdit.edit='overlay'"),
                            ("data.docs_per_row", 0, "data.docs_per_row=1"),
                            ("model.family", "unet", "model.family='unet'")):
    cfg = mmdit_config(data=1)
    node, *rest = key.split(".")
    target = cfg
    for k in key.split(".")[:-1]:
      target = target[k]
    target[key.split(".")[-1]] = value
    with pytest.raises(UserError) as e:
      Trainer(cfg, shd.make_mesh(cfg.mesh, devices=jax.devices()[:1]), vocab_size)
    assert words in str(e.value) and "\n" not in str(e.value)
    cfg = mmdit_config(data=1)
  cfg.model.condition.update(encoder="metaquery", llm="/nonexistent/llm")
  with pytest.raises(UserError, match="no config.json"):
    Trainer(cfg, shd.make_mesh(cfg.mesh, devices=jax.devices()[:1]), vocab_size)


def test_metaquery_trains_queries_through_a_frozen_llm(vocab_size, tmp_path):
  """MetaQuery: the unified model of a workdir, frozen, reads learnable queries in the place of
  the target image; a step moves the queries, the connector and the MMDiT, never the LLM."""
  from unimm.train.loop import Run
  llm_cfg = defaults()
  llm_cfg.model.update(width=32, depth=1, heads=2, mlp_dim=64, patch_size=8)
  llm_cfg.data.update(image_size=16, seq_len=64, batch_size=8)
  llm_cfg.mesh.data = 1
  llm_dir = str(tmp_path / "llm")
  llm_run = Run(llm_cfg, llm_dir, devices=jax.devices()[:1], with_data=False)
  llm_state = llm_run.restore_or_init()
  llm_run.ckpt.save(0, llm_state, make_iterator(llm_cfg), force=True)
  llm_run.ckpt.wait()
  with open(os.path.join(llm_dir, "config.json"), "w") as f:
    f.write(llm_cfg.to_json())
  cfg = mmdit_config(data=1)
  cfg.model.condition.update(encoder="metaquery", llm=llm_dir)
  cfg.model.mmdit.edit = "none"
  run = Run(cfg, str(tmp_path / "mq"), devices=jax.devices()[:1])
  state = run.restore_or_init()
  want = jax.device_get(llm_state["params"])
  got = jax.device_get(state["params"]["llm"])
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b)
  before = jax.device_get(state["params"])
  # the queries start as the LLM's input for a pure-noise image (position + modality + t = 1)
  from unimm.models.layers import timestep_embedding
  temb = np.asarray(timestep_embedding(np.ones((1,), np.float32), 256))
  val = lambda name: np.asarray(getattr(want[name], "value", want[name]))
  start = (val("patch_pos") + val("modality_embed")[NOISED_IMAGE]
           + np.asarray(jax.nn.silu(temb @ val("t_in")) @ val("t_out")))
  np.testing.assert_allclose(np.asarray(before["queries"]), start, rtol=1e-5, atol=1e-6)
  state, m = run.trainer.step(state, run.next_batch(), run.rng)
  after = jax.device_get(state["params"])
  for a, b in zip(jax.tree.leaves(before["llm"]), jax.tree.leaves(after["llm"])):
    np.testing.assert_array_equal(a, b)
  assert np.abs(np.asarray(after["queries"]) - np.asarray(before["queries"])).max() > 0
  assert np.isfinite(float(m["loss"]))
