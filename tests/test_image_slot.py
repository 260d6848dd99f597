"""The image-tokenizer slot of the unified model: vae latents, vq codes (early fusion,
MaskGIT, Janus-Pro's pixel understanding), encoded on the device from the pipeline's
pixels; latent caches; on tiny trained tokenizers (the "vq" one is FSQ: every quantizer
gives codes the same way)."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.batch import BATCH_KEYS, FEATURES
from unimm.config import defaults
from unimm.data import document as D
from unimm.data import records
from unimm.data.document import CLEAN_IMAGE, NOISED_IMAGE, TEXT
from unimm.data.pipeline import encode_document, make_iterator
from unimm.data.shapes import random_scene, render
from unimm.data.tokenizer import load_tokenizer
from unimm.errors import UserError
from unimm.models.image_tokenizer import encode_images, image_tokenizer
from unimm.objectives.losses import mask_ratio
from unimm.parallel.sharding import make_mesh
from unimm.sample import sampler_from_run
from unimm.train.loop import Run
from unimm.train.step import Trainer

TEXT_VOCAB = load_tokenizer("byte").model_vocab_size()


@pytest.fixture(scope="module")
def tokenizers(tiny_tokenizers):
  """conftest.py: a tiny vae and a tiny quantized (FSQ, 64 codes) tokenizer, 16x16, f=2."""
  return tiny_tokenizers


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
  """XLA with most optimisations off for this module: compiling, not running, is what
  these tiny models spend."""
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)


def config(tokenizers, kind="vq", loss="next_token", **model):
  c = defaults()
  c.model.update(width=32, depth=1, heads=2, mlp_dim=64, patch_size=4, image_tokenizer=kind,
                 tokenizer_path=tokenizers.get(kind, ""), image_loss=loss, **model)
  c.data.update(image_size=16, seq_len=256, batch_size=4)
  c.mesh.data = 1
  c.sample.update(max_new_tokens=4, mask_steps=3)
  c.optim.update(warmup_steps=1, lr=1e-2)
  c.train.steps = 10
  return c


def _image(seed=0):
  return render(random_scene(np.random.default_rng(seed), 1), 16)


def _t2i():
  return D.document("t2i", [D.text("a red circle", loss=False), D.image(_image(), "target")])


def _on_device(patcher, encoded):
  """encode_document's arrays (one document) as a batch of one row, encoded on the device."""
  batch = {k: jnp.asarray(v)[None] for k, v in encoded.items()}
  out = jax.jit(functools.partial(encode_images, patcher))(patcher.variables, batch)
  return {k: np.asarray(v)[0] for k, v in out.items()}


def test_vq_codes_are_tokens_with_next_token_loss_on_target_images(tokenizers):
  cfg = config(tokenizers)
  tok, patcher = load_tokenizer("byte"), image_tokenizer(cfg, TEXT_VOCAB)
  codes = patcher.vq.encode(_image()[None]).reshape(-1)
  e = encode_document(_t2i(), tok, patcher)
  n = len(codes)
  start = 1 + len("a red circle") + 1  # <bos> text <boi>
  # the pipeline delivers the pixels; the codes are pad until the step encodes them
  assert (e["encode"][start:start + n] == 1).all() and e["encode"].sum() == n
  f, (r, c) = patcher.patch_size, divmod(9, patcher.grid)  # code 9 covers these f x f pixels
  np.testing.assert_array_equal(e["pixels"][start + 9],
                                _image()[r * f:(r + 1) * f, c * f:(c + 1) * f].reshape(-1))
  assert (e["tokens"][start:start + n] == tok.pad_id).all()
  e = _on_device(patcher, e)
  np.testing.assert_array_equal(e["tokens"][start:start + n], codes + patcher.code_offset)
  np.testing.assert_array_equal(e["targets"][start - 1:start + n - 1], codes + patcher.code_offset)
  assert (e["modality"] == TEXT).all() and (e["image_ids"] == 0).all()
  np.testing.assert_array_equal(e["patch_index"][start:start + n], np.arange(n))
  # <boi> predicts the first code, each code the next; the last code does not predict <eoi>
  assert e["loss_mask"][start - 1:start + n - 1].all() and e["loss_mask"][start + n - 1] == 0
  assert e["patches"].shape == (len(e["tokens"]), 0)
  # a condition image's codes are context: no loss on them
  cap = encode_document(D.document("caption", [D.image(_image()), D.text("x")]), tok, patcher)
  assert cap["loss_mask"][:n + 2].sum() == 0 and cap["loss_mask"][n + 2] == 1


def test_masked_codes_are_bidirectional_images_without_lm_loss(tokenizers):
  cfg = config(tokenizers, loss="masked")
  patcher = image_tokenizer(cfg, TEXT_VOCAB)
  e = _on_device(patcher, encode_document(_t2i(), load_tokenizer("byte"), patcher))
  img = e["modality"] == NOISED_IMAGE
  assert img.sum() == 64 and (e["image_ids"][img] == 1).all() and e["loss_mask"][img].sum() == 0
  assert (e["tokens"][img] >= patcher.code_offset).all() and (e["tokens"][img] < patcher.mask_id).all()
  assert float(mask_ratio(0.0)) == 1.0 and abs(float(mask_ratio(1.0))) < 1e-6


def test_janus_condition_images_are_pixel_patches_targets_codes(tokenizers):
  cfg = config(tokenizers, understanding="pixels", vit_depth=1)
  patcher = image_tokenizer(cfg, TEXT_VOCAB)
  doc = D.document("edit", [D.image(_image(1)), D.text("make it blue", False),
                            D.image(_image(2), "target")])
  e = encode_document(doc, load_tokenizer("byte"), patcher)
  clean = e["modality"] == CLEAN_IMAGE
  assert clean.sum() == 16 and e["patches"].shape[1] == 48 and not e["encode"][clean].any()
  np.testing.assert_allclose(e["patches"][clean], patcher.understanding.encode(_image(1)))
  assert e["encode"].sum() == 64
  assert (_on_device(patcher, e)["tokens"] >= patcher.code_offset).sum() == 64


def test_vae_latent_patches_round_trip_the_vae(tokenizers):
  cfg = config(tokenizers, kind="vae", loss="flow", latent_patch=2)
  patcher = image_tokenizer(cfg, TEXT_VOCAB)
  assert (patcher.patch_size, patcher.num_patches, patcher.patch_dim) == (4, 16, 2 * 2 * 4)
  assert patcher.pixel_dim == 4 * 4 * 3
  img = _image()[None]
  tokens = patcher.tokens(patcher.variables, img)
  np.testing.assert_array_equal(patcher.decode(tokens), patcher.vae.decode(patcher.vae.encode(img)))


def _as_cached(doc, ae, encoded=lambda seg: True):
  """The document with each image that its tokenizer encodes given as a cached latent, as
  the host encoded it (ae.encode on one image): what the model read before encoding moved
  to the device."""
  segments = []
  for seg in doc["segments"]:
    if "image" in seg and encoded(seg):
      seg = {"kind": "image", "role": seg["role"], "latent": ae.encode(seg["image"][None])[0]}
    segments.append(seg)
  return dict(doc, segments=segments)


def _rows(encoded_rows, length, pad_id):
  """A batch of encoded documents packed into rows of `length` (several per row, then
  padding)."""
  batch = {k: [] for k in BATCH_KEYS}
  for docs in encoded_rows:
    docs = [dict(e, segment_ids=np.full(len(e["tokens"]), s, np.int32),
                 positions=np.arange(len(e["tokens"]), dtype=np.int32))
            for s, e in enumerate(docs, 1)]
    for k in BATCH_KEYS:
      row = np.concatenate([e[k] for e in docs])
      fill = pad_id if k in ("tokens", "targets") else 0
      batch[k].append(np.concatenate([row, np.full((length - len(row),) + row.shape[1:], fill,
                                                   row.dtype)]))
  return {k: np.stack(v) for k, v in batch.items()}


@pytest.mark.parametrize("kind,loss,extra", [
    ("vae", "flow", {}), ("vq", "next_token", {}), ("vq", "masked", {}),
    ("vq", "next_token", {"understanding": "pixels"})])
def test_device_encoding_gives_the_batch_of_host_encoding(tokenizers, kind, loss, extra):
  """Packed rows of pairs, captions, edits and a latent-cache document (a mixture), encoded
  by the train step's hook with the rows sharded over 2 devices, equal the rows of the same
  documents with every image host-encoded (as a latent cache gives them): vae latents
  within float tolerance, everything else exactly."""
  cfg = config(tokenizers, kind, loss, **extra)
  cfg.mesh.data = 2
  tok, patcher = load_tokenizer("byte"), image_tokenizer(cfg, TEXT_VOCAB)
  ae = patcher.vae if kind == "vae" else patcher.vq
  docs = [[_t2i(), D.document("edit", [D.image(_image(1)), D.text("make it blue", False),
                                       D.image(_image(2), "target")])],
          [D.document("caption", [D.image(_image(3)), D.text("a green square")]),
           _as_cached(D.document("t2i", [D.text("cached"), D.image(_image(4), "target")]), ae),
           D.document("story", [D.text("x"), D.image(_image(5), "target"), D.text("y"),
                                D.image(_image(6), "target")])]]
  # Janus-Pro's condition images are pixel patches on both sides
  encoded = lambda seg: not extra or seg["role"] == "target"
  raw = _rows([[encode_document(d, tok, patcher) for d in row] for row in docs], 512, tok.pad_id)
  want = _rows([[encode_document(_as_cached(d, ae, encoded), tok, patcher) for d in row]
                for row in docs], 512, tok.pad_id)
  assert raw["encode"].sum() == (4 if extra else 6) * patcher.num_patches
  assert not want["encode"].any()
  trainer = Trainer(cfg, make_mesh(cfg.mesh, jax.devices()[:2]), TEXT_VOCAB)
  encoded = jax.jit(trainer._encoding_images(lambda _, batch, __: batch))
  got = encoded(None, trainer.device_batch(raw), None, trainer.tokenizer_variables)
  for k in FEATURES:
    if k not in ("pixels", "encode"):
      check = (functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-5)
               if k == "patches" else np.testing.assert_array_equal)
      check(np.asarray(got[k]), want[k], err_msg=k)


@pytest.mark.parametrize("kind,loss,extra", [
    ("vq", "next_token", {}), ("vq", "masked", {"text_loss": "masked"}),  # (MaskGIT + MMaDA's text)
    ("vq", "next_token", {"understanding": "pixels", "vit_depth": 1}), ("vae", "flow", {})])
def test_each_recipe_trains_and_samples(tokenizers, tmp_path, kind, loss, extra):
  cfg = config(tokenizers, kind, loss, **extra)
  run = Run(cfg, str(tmp_path), devices=jax.devices()[:1])
  state = run.trainer.init()
  batch, rng = run.next_batch(), jax.random.key(7)
  before = float(run.trainer.loss_and_grads(state["params"], batch, rng)[0])
  # the step encodes the batch's pixels: the same loss as the batch encoded beforehand
  trainer = run.trainer
  given = jax.jit(functools.partial(encode_images, trainer.image_tokenizer))(
      trainer.tokenizer_variables, batch)
  given["encode"] = jnp.zeros_like(batch["encode"])
  assert float(trainer.loss_and_grads(state["params"], given, rng)[0]) == before
  for _ in range(4):  # the same batch: its loss (same noise / masks) must fall
    state, m = run.trainer.step(state, batch, run.rng)
  after = float(run.trainer.loss_and_grads(state["params"], batch, rng)[0])
  assert np.isfinite(after) and after < before
  run.ckpt.save(4, state, run.data, force=True)  # every parameter can be checkpointed
  run.ckpt.wait()
  restored = run.restore_or_init()
  assert int(restored["step"]) == 4
  s = sampler_from_run(run, state)
  images = s.text_to_image(["a red circle", "a blue square"])
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  assert s.edit(images, ["make it green", "remove it"]).shape == (2, 16, 16, 3)
  assert len(s.image_to_text(images)) == 2


def test_vq_sampling_is_deterministic_per_seed(tokenizers, tmp_path):
  cfg = config(tokenizers, loss="masked")
  run = Run(cfg, str(tmp_path), devices=jax.devices()[:1])
  s = sampler_from_run(run, run.trainer.init())
  a, b = s.text_to_image(["a red circle"], seed=3), s.text_to_image(["a red circle"], seed=3)
  np.testing.assert_array_equal(a, b)


def test_config_mismatches_are_one_line_errors(tokenizers):
  with pytest.raises(UserError, match="does not go with"):
    image_tokenizer(config(tokenizers, kind="vq", loss="flow"), TEXT_VOCAB)
  with pytest.raises(UserError, match="needs model.tokenizer_path"):
    image_tokenizer(config({}, kind="vae", loss="flow"), TEXT_VOCAB)
  with pytest.raises(UserError, match="holds a 'vae' tokenizer"):
    cfg = config(tokenizers, kind="vq")
    cfg.model.tokenizer_path = tokenizers["vae"]
    image_tokenizer(cfg, TEXT_VOCAB)
  with pytest.raises(UserError, match="square images only"):
    cfg = config(tokenizers)
    cfg.data.max_aspect = 2.0
    image_tokenizer(cfg, TEXT_VOCAB)


def _cache(directory, tok_dir, kind, images, latents):
  """A latent cache in the record schema (as unimm.tokenize writes it): t2i pairs whose
  images are latents only."""
  w = records.ShardWriter(directory)
  for i, z in enumerate(latents):
    w.write({"task": "t2i", "segments": [
        {"kind": "text", "text": f"pair {i}", "loss": False},
        {"kind": "image", "role": "target", "latent": records.latent_field(z)}]})
  w.close({"format": "cache", "documents": len(latents),
           "tokenizer": {"workdir": os.path.abspath(tok_dir), "kind": kind, "image_size": 16}})


def test_latent_cache_streams_the_same_tokens_as_the_images(tokenizers, tmp_path):
  cfg = config(tokenizers, loss="next_token")
  cfg.data.update(cfg_dropout=0.0, pair_caption_prob=0.0, batch_size=1, seq_len=128)
  patcher = image_tokenizer(cfg, TEXT_VOCAB)
  images = np.stack([_image(i) for i in range(3)])
  codes = patcher.vq.encode(images)
  _cache(str(tmp_path / "cache"), tokenizers["vq"], "vq", images, list(codes))
  cfg.data.mixture = str(tmp_path / "cache")
  seen = set()
  it = make_iterator(cfg)
  for _ in range(8):  # the packer may hold documents back: read past one epoch
    b = next(it)
    row, seg = b["tokens"][0], b["segment_ids"][0]
    for k in set(seg[seg > 0].tolist()):
      codes_k = row[(seg == k) & (row >= patcher.code_offset)]
      seen.add(tuple(codes_k - patcher.code_offset))
  assert seen == {tuple(c.reshape(-1)) for c in codes}
  # a cache made by another tokenizer is refused with the fix
  cfg.model.update(image_tokenizer="vae", tokenizer_path=tokenizers["vae"], image_loss="flow")
  with pytest.raises(UserError, match="latent cache of the vq tokenizer"):
    make_iterator(cfg)


def test_vae_latent_cache_matches_online_encoding(tokenizers, tmp_path):
  cfg = config(tokenizers, kind="vae", loss="flow")
  patcher = image_tokenizer(cfg, TEXT_VOCAB)
  images = np.stack([_image(i) for i in range(2)])
  latents = patcher.vae.encode(images)
  _cache(str(tmp_path / "cache"), tokenizers["vae"], "vae", images, list(latents))
  doc = records.unpack(open_records(str(tmp_path / "cache"))[0])
  z = records.read_latent(doc["segments"][1])  # stored float16
  online = patcher.tokens(patcher.variables, images[:1])[0]  # what the train step computes
  np.testing.assert_allclose(patcher.from_latent(z), online, rtol=1e-3, atol=1e-3)


def open_records(directory):
  from unimm.data.pipeline import ConvertedSource
  src = ConvertedSource(directory)
  return [src[i] for i in range(len(src))]


def test_next_token_sampling_matches_the_teacher_forced_model(tokenizers, tmp_path, monkeypatch):
  """The code logits of KV-cached decoding equal those of one full forward pass over the
  finished sequence (same positions, patch positions and mask as in training)."""
  cfg = config(tokenizers)
  cfg.sample.update(cfg_scale=1.0, image_temperature=0.0)
  run = Run(cfg, str(tmp_path), devices=jax.devices()[:1])
  state = run.trainer.init()
  batch = run.next_batch()
  for _ in range(3):  # away from the initial parameters
    state, _ = run.trainer.step(state, batch, run.rng)
  s = sampler_from_run(run, state)
  p, tok = run.patcher, run.tokenizer
  steps, ids = [], []  # each step's code logits; the sampled ids, as they go to the decoder
  guided, decode = s._guided_codes, p.decode
  def record(c, u):
    out = guided(c, u)  # without guidance (cfg_scale 1): the code logits of the prompt
    steps.append(np.asarray(out))
    return out
  monkeypatch.setattr(s, "_guided_codes", record)
  monkeypatch.setattr(p, "decode", lambda x, **kw: ids.append(np.asarray(x)) or decode(x))
  s.text_to_image(["a red circle"])
  e = encode_document(D.document("t2i", [D.text("a red circle"), D.image(_image(), "target")]),
                      tok, p, add_eos=False)
  code_pos = np.nonzero(e["encode"])[0]  # the image's codes: set to the sampled ones
  e["tokens"][code_pos] = ids[0][0]
  b = {k: np.asarray(v)[None] for k, v in e.items()}
  b["segment_ids"] = np.ones_like(b["tokens"])
  b["positions"] = np.arange(b["tokens"].shape[1])[None]
  logits, _ = s._forward(s.params, b, np.zeros(b["tokens"].shape, np.float32))
  full = np.asarray(logits)[0, code_pos - 1, p.code_offset:p.code_offset + p.num_codes]
  np.testing.assert_allclose(np.concatenate(steps), full, rtol=1e-4, atol=1e-4)
