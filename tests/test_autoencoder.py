"""Image-tokenizer training (unimm.train.autoencoder) on tiny configs."""

import json
import os
import sys

import jax
import pytest

from tests.helpers import quick_compiles
from unimm.errors import UserError
from unimm.train import autoencoder as ae


@pytest.fixture(scope="module", autouse=True)
def _quick_compiles():
  """Tiny tokenizers trained a few steps: XLA with most optimisations off (conftest)."""
  with quick_compiles():
    yield


def tiny(kind="vae", quantizer="vq", steps=8):
  c = ae.default_config()
  c.data.update(image_size=16, batch_size=4)
  c.train.update(steps=steps, log_every=1, ckpt_every=100)
  c.optim.update(lr=3e-3, warmup_steps=2)
  c.mesh.data = 1
  c.tokenizer.update(kind=kind, quantizer=quantizer, block_out_channels=(8, 16),
                     norm_num_groups=4, num_codes=64, code_dim=4, fsq_levels=(4, 4, 4),
                     eval_images=4, dead_code_threshold=0.5)
  return c


def _train(cfg, workdir, lines=None):
  log = (lambda s: lines.append(s)) if lines is not None else (lambda s: None)
  return ae.train(cfg, str(workdir), devices=jax.devices()[:1], log=log)


def _metrics(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.mark.parametrize("kind,quantizer", [("vae", "vq"), ("vq", "vq"), ("vq", "fsq")])
def test_training_reduces_reconstruction_and_writes_eval(tmp_path, kind, quantizer):
  _, result = _train(tiny(kind, quantizer), tmp_path)
  m = _metrics(tmp_path)
  assert [r["step"] for r in m] == list(range(1, 9))
  assert m[-1]["rec"] < 0.8 * m[0]["rec"]
  assert ("kl" in m[0]) == (kind == "vae")
  saved = json.load(open(tmp_path / "eval.json"))
  assert saved == result and saved["step"] == 8 and saved["psnr"] > 0
  if kind == "vq":
    for k in ("usage", "perplexity", "quantizer_loss"):
      assert k in m[-1]
    assert 0 < saved["usage"] <= 1 and saved["perplexity"] >= 1
    assert saved["num_codes"] == 64  # 64 codes, or FSQ levels 4 x 4 x 4
  if quantizer == "vq" and kind == "vq":
    # Cluster sizes start at 0: the first step restarts (data-initialises) the codebook.
    assert m[0]["restarted"] > 0
  assert os.listdir(tmp_path / "tb") and os.listdir(tmp_path / "checkpoints")


@pytest.mark.parametrize("flag,word", [("--config.tokenizer.kind=gan", "tokenizer.kind"),
                                       ("--config.tokenizer.quantizer=rvq", "tokenizer.quantizer")])
def test_bad_config_is_one_line(tmp_path, capsys, monkeypatch, flag, word):
  extra = ["--config.tokenizer.kind=vq"] if "quantizer" in flag else []
  monkeypatch.setattr(sys, "argv", ["autoencoder", "--workdir", str(tmp_path), *extra, flag])
  with pytest.raises(SystemExit) as e:
    ae.cli(ae.main)
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and word in err and "\n" not in err


def test_unknown_kind_raises_before_building():
  with pytest.raises(UserError, match="tokenizer.kind"):
    ae.check_config(tiny(kind="gan"))


# --- PatchGAN discriminator and perceptual loss ------------------------------------------------


@pytest.mark.parametrize("norm", ["group", "none"])
def test_discriminator_patch_logits_shape(norm):
  from flax import nnx
  import jax.numpy as jnp
  from unimm.models.discriminator import PatchDiscriminator, output_size
  d = PatchDiscriminator(channels=8, n_layers=2, norm=norm, rngs=nnx.Rngs(0))
  out = d(jnp.zeros((2, 16, 16, 3)))
  assert out.shape == (2, output_size(16, 2), output_size(16, 2), 1) == (2, 2, 2, 1)
  assert d(jnp.zeros((1, 32, 32, 3))).shape == (1, 6, 6, 1)


def test_perceptual_distance_zero_for_identical_images(tmp_path):
  import numpy as np
  from unimm.models.perceptual import load_perceptual, perceptual_distance, write_random_weights
  rng = np.random.default_rng(0)
  x = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  y = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  for name in ("p.npz", "p.safetensors"):
    net = load_perceptual(write_random_weights(str(tmp_path / name)))
    assert len(net["lins"]) == 2
    np.testing.assert_array_equal(np.asarray(perceptual_distance(net, x, x)), [0.0, 0.0])
    assert np.all(np.asarray(perceptual_distance(net, x, y)) > 0)


def test_missing_perceptual_file_is_one_line_error_naming_it(tmp_path):
  c = tiny("vq")
  missing = str(tmp_path / "lpips_vgg.safetensors")
  c.tokenizer.update(perceptual_weight=0.1, perceptual_weights=missing)
  with pytest.raises(UserError) as e:
    ae.check_config(c)
  assert missing in str(e.value) and "does not exist" in str(e.value) and "\n" not in str(e.value)


def test_gan_starts_at_disc_start_trains_the_discriminator_and_resumes(tmp_path):
  """(also: a restart with more steps continues from the saved step)"""
  import numpy as np
  from unimm.models.perceptual import write_random_weights
  c = tiny("vq", "vq", steps=4)
  c.tokenizer.update(disc_weight=0.5, disc_start=2, disc_layers=2, disc_channels=8,
                     perceptual_weight=0.1,
                     perceptual_weights=write_random_weights(str(tmp_path / "p.npz")))
  work = tmp_path / "run"
  state, _ = _train(c, work)
  init = _initial_disc_params(c)
  m = _metrics(work)
  for r in m[:2]:  # steps 0 and 1: no generator term, no discriminator update
    assert r["gan_weight"] == 0.0 and r["d_loss"] == 0.0
    assert abs(r["loss"] - (r["rec"] + 0.1 * r["perceptual"] + r["quantizer_loss"])) < 1e-5
  for r in m[2:]:
    assert np.isfinite(r["adaptive_weight"]) and r["adaptive_weight"] > 0
    assert r["gan_weight"] == pytest.approx(0.5 * r["adaptive_weight"]) and r["d_loss"] > 0
    assert r["perceptual"] > 0
  disc = jax.tree.leaves(jax.device_get(state["disc_params"]))
  assert any(not np.array_equal(a, b) for a, b in zip(disc, init))
  # Same workdir, same steps: restored from the checkpoint, discriminator included.
  lines = []
  state2, _ = _train(c, work, lines)
  assert lines[0].startswith("step 4 of 4")
  for a, b in zip(disc, jax.tree.leaves(jax.device_get(state2["disc_params"]))):
    np.testing.assert_array_equal(a, b)
  # More steps in the same workdir: training continues from the saved step.
  c.train.steps = 5
  lines = []
  state3, result = _train(c, work, lines)
  assert lines[0].startswith("step 4 of 5")
  assert [r["step"] for r in _metrics(work)] == [1, 2, 3, 4, 5]
  assert int(state3["step"]) == 5 and result["step"] == 5


def _initial_disc_params(cfg):
  """The discriminator's initial params (leaves, numpy) for `cfg`."""
  from flax import nnx
  from unimm.parallel import sharding as shd
  trainer = ae.AutoencoderTrainer(cfg, shd.make_mesh(cfg.mesh, jax.devices()[:1]))
  return jax.tree.leaves(jax.device_get(nnx.split(trainer._build_disc(), nnx.Param)[1]))


def _folder(path, good, bad):
  """A converted-style folder: `good` Shapes pairs (64x64 PNG) then `bad` records whose
  image bytes are not an image."""
  from unimm.data import fixtures, records
  w = records.ShardWriter(str(path))
  pairs = fixtures.shapes_pairs(good, image_size=64)
  for png, caption in pairs:
    w.write({"task": "t2i", "segments": [{"kind": "text", "text": caption, "loss": False},
                                          {"kind": "image", "bytes": png, "role": "target"}]})
  for _ in range(bad):
    w.write({"task": "t2i", "segments": [{"kind": "image", "bytes": b"not an image", "role": "target"}]})
  w.close({"format": "test"})
  return [records.decode_image(png, size=(16, 16)) for png, _ in pairs]


def test_trains_on_a_data_source_and_counts_its_bad_records(tmp_path):
  import numpy as np
  good = _folder(tmp_path / "folder", 3, 1)
  c = tiny(steps=2)
  c.data.mixture = str(tmp_path / "folder")
  batch = ae.ImageStream(c).batch(0)
  assert batch.shape == (4, 16, 16, 3)
  assert all(any(np.array_equal(x, g) for g in good) for x in batch)  # images of the folder
  _train(c, tmp_path / "work")
  last = _metrics(tmp_path / "work")[-1]
  assert last["data/read/folder"] >= 8 and last["data/skipped/folder/undecodable_image"] >= 1


def test_a_source_of_bad_records_stops_with_its_name(tmp_path):
  _folder(tmp_path / "broken", 1, 9)
  c = tiny(steps=2)
  c.data.update(mixture=str(tmp_path / "broken"), error_min_records=5)
  with pytest.raises(UserError, match="data source 'broken'.*undecodable_image"):
    ae.ImageStream(c).batch(0)
