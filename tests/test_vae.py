"""KL VAE: parity with diffusers' AutoencoderKL, export / single-file loading, bad input, latent scaling."""

import os

import numpy as np
import pytest
from flax import nnx

from unimm.errors import UserError
from unimm.interop.diffusers_vae import export_diffusers_vae, ldm_key, load_diffusers_vae
from unimm.models.vae import FAMILIES, AutoencoderKL, family_config


def torch_deps():
  """(torch, diffusers, safetensors.torch), or skip: only the parity tests need them."""
  return (pytest.importorskip("torch"), pytest.importorskip("diffusers"),
          pytest.importorskip("safetensors.torch"))


CONFIGS = {
    # SD-like: 4 latent channels with quant convs; FLUX-like: 16 channels, none.
    "sd": dict(latent_channels=4, use_quant_conv=True, use_post_quant_conv=True,
               scaling_factor=0.18215, shift_factor=None, size=32),
    "flux": dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False,
                 scaling_factor=0.3611, shift_factor=0.1159, size=16),
}
TOL = 1e-4


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).max() / np.abs(b).max())


def nchw(x):
  return np.transpose(np.asarray(x), (0, 3, 1, 2))


def params(model):
  return {".".join(map(str, p)): np.asarray(v.get_value())
          for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


class Case:
  """A random diffusers VAE saved to disk, its inputs and its outputs."""

  def __init__(self, name, root):
    torch, diffusers, _ = torch_deps()
    spec = dict(CONFIGS[name])
    size = spec.pop("size")
    torch.manual_seed(0)
    self.torch_vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64),
        layers_per_block=1, norm_num_groups=32, **spec).eval()
    with torch.no_grad():  # move norms / biases off their 1 / 0 init so every mapping is tested
      for p in self.torch_vae.parameters():
        p.add_(0.05 * torch.randn_like(p))
    self.dir = os.path.join(root, name)
    self.torch_vae.save_pretrained(self.dir, safe_serialization=True)
    rng = np.random.default_rng(0)
    self.x = rng.uniform(-1, 1, (2, size, size, 3)).astype(np.float32)
    self.z = rng.normal(size=(2, size // 2, size // 2, spec["latent_channels"])).astype(np.float32)
    self.want_mean, self.want_image = self.torch_outputs(self.torch_vae)
    self.model, self.config = load_diffusers_vae(self.dir)

  def torch_outputs(self, vae):
    torch = torch_deps()[0]
    with torch.no_grad():
      mean = vae.encode(torch.from_numpy(nchw(self.x).copy())).latent_dist.mean.numpy()
      image = vae.decode(torch.from_numpy(nchw(self.z).copy())).sample.numpy()
    return mean, image

  def check(self, model):
    mean, logvar = model.encode(self.x)
    image = model.decode(self.z)
    assert logvar.shape == mean.shape
    errs = rel_err(nchw(mean), self.want_mean), rel_err(nchw(image), self.want_image)
    assert max(errs) <= TOL, errs
    return errs


@pytest.fixture(scope="module", params=list(CONFIGS))
def case(request, tmp_path_factory):
  return Case(request.param, str(tmp_path_factory.mktemp("vae")))


def test_parity_with_diffusers(case):
  enc, dec = case.check(case.model)
  print(f"max rel err encoder {enc:.2e} decoder {dec:.2e}")
  spec = CONFIGS[case.dir.rsplit(os.sep, 1)[-1]]
  assert case.config.latent_channels == spec["latent_channels"]
  assert case.config.use_quant_conv == spec["use_quant_conv"]
  assert case.config.scaling_factor == spec["scaling_factor"]
  assert case.config.shift_factor == (spec["shift_factor"] or 0.0)


def test_export_round_trip(case, tmp_path):
  torch, diffusers, _ = torch_deps()
  out = str(tmp_path / "export")
  export_diffusers_vae(case.model, case.config, out)
  reloaded = diffusers.AutoencoderKL.from_pretrained(out).eval()
  want = case.torch_vae.state_dict()
  got = reloaded.state_dict()
  assert set(got) == set(want)
  for k in want:
    assert torch.equal(got[k], want[k]), k
  mean, image = case.torch_outputs(reloaded)
  np.testing.assert_array_equal(mean, case.want_mean)
  np.testing.assert_array_equal(image, case.want_image)
  assert reloaded.config.scaling_factor == case.config.scaling_factor
  again, config = load_diffusers_vae(out)
  assert config == case.config
  a, b = params(case.model), params(again)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_single_file_ldm_layout(case, tmp_path):
  torch, _, safetensors_torch = torch_deps()
  from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
  name = case.dir.rsplit(os.sep, 1)[-1]
  sd = case.torch_vae.state_dict()
  ldm = {}
  for k, v in sd.items():
    if ".mid_block.attentions.0.to_" in k and k.endswith("weight"):
      v = v[:, :, None, None]  # the original checkpoints store attention as 1x1 convs
    ldm[ldm_key(k, 2)] = v.contiguous()
  assert "encoder.down.0.block.0.norm1.weight" in ldm and "decoder.up.1.upsample.conv.weight" in ldm
  # diffusers' own single-file conversion must map these names back to its layout exactly.
  back = convert_ldm_vae_checkpoint(dict(ldm), case.torch_vae.config)
  assert set(back) == set(sd)
  for k in sd:
    assert torch.equal(back[k], sd[k]), k
  prefix = "first_stage_model." if name == "sd" else ""
  path = str(tmp_path / "vae.safetensors")
  safetensors_torch.save_file({prefix + k: v for k, v in ldm.items()}, path)
  if name == "flux":
    with pytest.raises(UserError, match="family="):
      load_diffusers_vae(path)
  model, config = load_diffusers_vae(path, family=None if name == "sd" else "flux")
  assert config == case.config
  case.check(model)


def expect_error(path, *parts):
  with pytest.raises(UserError) as e:
    load_diffusers_vae(path)
  msg = str(e.value)
  assert "\n" not in msg
  for p in parts:
    assert p in msg, msg
  return msg


def test_bad_input(tmp_path):
  from safetensors.numpy import load_file, save_file
  good = str(tmp_path / "good")
  cfg = family_config("sd", block_out_channels=(32, 64), layers_per_block=1)
  export_diffusers_vae(AutoencoderKL(cfg, rngs=nnx.Rngs(0)), cfg, good)
  tensors = load_file(os.path.join(good, "diffusion_pytorch_model.safetensors"))

  def rewrite(name, edit):
    out = tmp_path / name
    out.mkdir()
    t = dict(tensors)
    edit(t)
    save_file(t, str(out / "diffusion_pytorch_model.safetensors"))
    (out / "config.json").write_text((tmp_path / "good" / "config.json").read_text())
    return str(out)

  expect_error(str(tmp_path / "nope"), "does not exist")
  (tmp_path / "empty").mkdir()
  expect_error(str(tmp_path / "empty"), "config.json")
  key = "encoder.mid_block.attentions.0.to_q.weight"
  print(expect_error(rewrite("shape", lambda t: t.__setitem__(key, np.zeros((64, 32), np.float32))),
                     key, "(64, 32)", "(64, 64)"))
  missing = "decoder.conv_out.bias"
  print(expect_error(rewrite("missing", lambda t: t.pop(missing)), missing))
  other = str(tmp_path / "other.safetensors")
  save_file({"model.diffusion_model.x": np.zeros(3, np.float32)}, other)
  print(expect_error(other, "not an AutoencoderKL checkpoint"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_latent_normalisation(name):
  table = {"sd": (4, 0.18215, 0.0, True), "sdxl": (4, 0.13025, 0.0, True),
           "sd3": (16, 1.5305, 0.0609, False), "flux": (16, 0.3611, 0.1159, False)}
  channels, scale, shift, quant = table[name]
  cfg = family_config(name, block_out_channels=(32,), layers_per_block=1)
  assert (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) == (channels, scale, shift)
  assert cfg.use_quant_conv == cfg.use_post_quant_conv == quant
  model = AutoencoderKL(cfg, rngs=nnx.Rngs(0))
  x = np.random.default_rng(1).normal(size=(2, 4, 4, channels)).astype(np.float32)
  z = model.to_latents(x)
  np.testing.assert_allclose(z, (x - shift) * scale, rtol=1e-6)
  np.testing.assert_allclose(model.from_latents(z), x, rtol=1e-5, atol=1e-6)
  assert model.encode(np.zeros((1, 8, 8, 3), np.float32))[0].shape == (1, 8, 8, channels)
  with pytest.raises(UserError, match="unknown vae family"):
    family_config("sd4")
