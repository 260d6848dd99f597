"""X-Omni's diffusion decoder: an MMDiT whose text stream is the target image's codes by a frozen
VQ tokenizer (model.condition.encoder="vq"), and a unified model whose generated codes it
renders (model.image_decoder). Tiny shapes: 16x16 Shapes images, the conftest's FSQ tokenizer
(f=2: 64 codes an image), 8x8 patches."""

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
from unimm.models.conditioning import gather
from unimm.models.image_tokenizer import CodedPixels, RenderedCodes, encode_images, image_tokenizer
from unimm.parallel import sharding as shd
from unimm.train.step import Trainer
from tests.helpers import assert_8_devices_equal_one
from tests.helpers import quick_compiling_module as _quick_compiles  # noqa: F401 (autouse)
from tests.test_mmdit_train import decoder_config


def vq_decoder_config(vq_dir, **mesh):
  c = decoder_config(**mesh)
  c.model.condition.update(encoder="vq", tokenizer=vq_dir, depth=1)
  return c


@pytest.fixture(scope="module")
def decoder(tiny_tokenizers, tmp_path_factory, _quick_compiles):
  """A trained-for-one-step decoder saved as a workdir: (run, state, host batch)."""
  from unimm.train.loop import Run
  cfg = vq_decoder_config(tiny_tokenizers["vq"], data=1)
  run = Run(cfg, str(tmp_path_factory.mktemp("decoder")), devices=jax.devices()[:1])
  state = run.trainer.init()
  batch = next(run.data)
  state, m = run.trainer.step(state, run.trainer.device_batch(batch), run.rng)
  assert np.isfinite(float(m["loss"]))
  run.ckpt.save(1, state, run.data, force=True)
  run.ckpt.wait()
  with open(os.path.join(run.workdir, "config.json"), "w") as f:
    f.write(cfg.to_json())
  return run, state, jax.device_get(batch)


def test_decoder_reads_the_targets_codes_and_renders_codes_as_trained(decoder):
  """The step's `codes` are the frozen tokenizer's codes of each row's target image; the model
  conditioned on them predicts what `from_codes` (rendering generated codes) predicts; the
  sampler's round trip encodes with the same tokenizer."""
  run, state, np_batch = decoder
  tokenizer = run.trainer.image_tokenizer
  assert isinstance(tokenizer, CodedPixels) and tokenizer.num_codes == 64
  batch = encode_images(tokenizer, tokenizer.variables, jax.tree.map(jnp.asarray, np_batch))
  model = nnx.merge(run.trainer.graphdef, state["params"])
  idx, ok = model.target_tokens(batch)
  rows = np.asarray(ok[:, 0])
  assert rows.sum() >= 4
  target = gather(batch["patches"], idx)
  images = tokenizer.decode(np.asarray(target))
  want = tokenizer.vq.encode(images).reshape(len(images), -1)
  np.testing.assert_array_equal(np.asarray(batch["codes"])[rows], want[rows])
  x_t = jax.random.normal(jax.random.key(1), target.shape)
  t = jnp.linspace(0.1, 0.9, target.shape[0])
  np.testing.assert_allclose(np.asarray(model(batch, x_t, t))[rows],
                             np.asarray(model.from_codes(batch["codes"], x_t, t))[rows],
                             rtol=1e-5, atol=1e-6)
  from unimm.sampling.mmdit import DiffusionSampler
  sampler = DiffusionSampler(run.trainer.graphdef, state["params"], run.cfg, load_tokenizer("byte"),
                             tokenizer)
  assert sampler.reconstructs
  np.testing.assert_array_equal(sampler.image_codes(images[:2]), want[:2])


def test_decoder_on_8_devices_equals_one(decoder):
  run, state, np_batch = decoder
  assert_8_devices_equal_one(run, state, np_batch)


def test_unified_model_renders_its_codes_through_the_decoder(decoder, tiny_tokenizers, tmp_path):
  """model.image_decoder: the unified model's vq codes are rendered by the decoder's sampler
  (not the VQ decoder); a decoder of another tokenizer, or a workdir holding none, is refused
  in one line."""
  from tests.test_image_slot import config
  from unimm.sample import load_sampler
  run, _, _ = decoder
  cfg = config(tiny_tokenizers, kind="vq", image_decoder=run.workdir)
  grid = image_tokenizer(cfg, load_tokenizer("byte").model_vocab_size())
  assert isinstance(grid, RenderedCodes)
  codes = np.random.default_rng(0).integers(0, grid.num_codes, (2, grid.num_patches))
  images = grid.decode(codes + grid.code_offset)
  assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(images, load_sampler(run.workdir).render_codes(codes))
  vq = grid.vq_decode(codes + grid.code_offset)  # GRPO's cheap reward render: the VQ decoder
  np.testing.assert_array_equal(vq, grid.vq.decode(codes.reshape(2, grid.grid, grid.grid)))
  assert not np.array_equal(vq, images)
  saved = json.loads(run.cfg.to_json())
  for k, change in enumerate(({"tokenizer": tiny_tokenizers["vae"]}, {"encoder": "text"})):
    other = tmp_path / str(k)
    other.mkdir()
    cond = dict(saved["model"]["condition"], **change)
    (other / "config.json").write_text(json.dumps(dict(saved, model=dict(saved["model"], condition=cond))))
    with pytest.raises(UserError, match="no diffusion decoder of the codes") as e:
      image_tokenizer(config(tiny_tokenizers, kind="vq", image_decoder=str(other)), 300)
    assert "\n" not in str(e.value)
  for kind, path, why in (("vq", str(tmp_path / "none"), "holds no training workdir"),
                         ("pixels", run.workdir, "needs model.image_tokenizer='vq'")):
    with pytest.raises(UserError, match=why) as e:
      image_tokenizer(config(tiny_tokenizers, kind=kind, loss="next_token" if kind == "vq" else "flow",
                             image_decoder=path), 300)
    assert "\n" not in str(e.value)
  with pytest.raises(UserError, match="holds a vae tokenizer") as e:
    Trainer(vq_decoder_config(tiny_tokenizers["vae"]), shd.make_mesh(run.cfg.mesh, jax.devices()[:1]),
            run.trainer.vocab_size)
  assert "\n" not in str(e.value)
