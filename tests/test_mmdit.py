"""The MMDiT (unimm.models.mmdit) and its checkpoint interop (unimm.interop.diffusers_mmdit):
tiny random diffusers FluxTransformer2DModel / SD3Transformer2DModel / QwenImageTransformer2DModel
(and the BFL FLUX layout) loaded and run on the same inputs (float32, max relative error <= 1e-4),
latents fed to us as (ph, pw, c) patch vectors and to diffusers through the pipelines' own
(c, ph, pw) packing; export back to diffusers; scan on / off; the full-size parameter counts;
one-line errors for checkpoints that do not fit."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

import jax.numpy as jnp  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline  # noqa: E402
from diffusers.pipelines.qwenimage.pipeline_qwenimage import QwenImagePipeline  # noqa: E402
from flax import nnx  # noqa: E402

from unimm import config as config_lib  # noqa: E402
from unimm.errors import UserError  # noqa: E402
from unimm.image_grid import patchify  # noqa: E402
from unimm.interop import diffusers_mmdit  # noqa: E402
from unimm.models.mmdit import MMDiT, parameter_count  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
B, LT, C = 2, 5, 4          # batch, text tokens, latent channels (patch vectors: 2 x 2 x 4 = 16)
CONTEXT, POOLED = 24, 12
GRID, REF = (3, 2), (1, 3)  # target and reference (Kontext / edit) patch grids
TINY = dict(num_attention_heads=2, attention_head_dim=16, joint_attention_dim=CONTEXT)


def _perturb(model, seed):
  """Non-trivial weights: norms around 1, biases and weights larger than the init."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight") and p.ndim == 1:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.15)
  return model.eval()


def _rel(ours, ref):
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _ours(path, **model):
  cfg = config_lib.defaults()
  diffusers_mmdit.apply_model_fields(cfg, path)
  cfg.model.update(attention="xla", **model)
  return cfg, MMDiT(cfg.model, patch_dim=0, rngs=nnx.Rngs(0))


@nnx.jit
def _forward(model, img, txt, t, img_ids, txt_ids, img_mask, txt_mask, pooled, guidance):
  return model(img, txt, t, img_ids, txt_ids, img_mask, txt_mask, pooled, guidance)


def _inputs(seed=0, ref=False):
  """Latents [B, C, h, w] of the target (and reference) image, text features with the last two
  tokens of row 1 padding (junk values), t, pooled, guidance."""
  rng = np.random.default_rng(seed)
  lat = [rng.standard_normal((B, C, 2 * GRID[0], 2 * GRID[1]), np.float32)]
  if ref:
    lat.append(rng.standard_normal((B, C, 2 * REF[0], 2 * REF[1]), np.float32))
  txt = rng.standard_normal((B, LT, CONTEXT), np.float32)
  txt_mask = np.ones((B, LT), bool)
  txt_mask[1, 3:] = False
  txt[1, 3:] = 50.0 * rng.standard_normal((2, CONTEXT))
  return dict(latents=lat, txt=txt, txt_mask=txt_mask, t=np.array([0.3, 0.8], np.float32),
              pooled=rng.standard_normal((B, POOLED), np.float32),
              guidance=np.array([3.5, 2.0], np.float32))


def _hwc(latents):
  """[B, C, h, w] -> our patch vectors [B, h/2 * w/2, (2, 2, C)]."""
  return patchify(latents.transpose(0, 2, 3, 1), 2)


def _to_chw(tokens):
  """Our output patch vectors (2, 2, C) -> diffusers' packing (C, 2, 2)."""
  return tokens.reshape(*tokens.shape[:-1], 2, 2, -1).transpose(0, 1, 4, 2, 3).reshape(tokens.shape)


def _run_ours(model, x, grids, txt_ids=None, pooled=True, guidance=True):
  img = np.concatenate([_hwc(lat) for lat in x["latents"]], axis=1)
  ids = np.concatenate([model.image_ids(*g, frame=i) for i, g in enumerate(grids)])
  if txt_ids is None:
    txt_ids = model.text_ids(LT, *grids[0])
  out = _forward(model, jnp.asarray(img), jnp.asarray(x["txt"]), jnp.asarray(x["t"]),
                 jnp.broadcast_to(ids, (B,) + ids.shape), jnp.broadcast_to(txt_ids, (B, LT, 3)),
                 jnp.ones((B, ids.shape[0]), bool), jnp.asarray(x["txt_mask"]),
                 jnp.asarray(x["pooled"]) if pooled else None,
                 jnp.asarray(x["guidance"]) if guidance else None)
  return np.asarray(out)


def _check_rows(ours, reference, name):
  """Row by row (row 1 without its text padding): max relative error <= 1e-4."""
  rel = max(_rel(ours[b], reference[b]) for b in range(B))
  print(f"{name}: max |ours - diffusers| / max |diffusers| = {rel:.2e}")
  assert rel <= 1e-4
  return rel


# ------------------------------------------------------------------ FLUX


def _flux_pack(latents):
  b, c, h, w = latents.shape
  return FluxPipeline._pack_latents(torch.from_numpy(latents), b, c, h, w)


def _flux_reference(model, x, grids, guidance=True):
  """diffusers on each row alone, row 1 without its padded text tokens."""
  hidden = torch.cat([_flux_pack(lat) for lat in x["latents"]], dim=1)
  img_ids = []
  for i, (rows, cols) in enumerate(grids):  # as pipeline_flux_kontext: reference i has frame id i
    ids = FluxPipeline._prepare_latent_image_ids(1, rows, cols, "cpu", torch.float32)
    ids[:, 0] = i
    img_ids.append(ids)
  img_ids = torch.cat(img_ids)
  rows = []
  with torch.no_grad():
    for b in range(B):
      n = int(x["txt_mask"][b].sum())
      out = model(hidden_states=hidden[b:b + 1],
                  encoder_hidden_states=torch.from_numpy(x["txt"][b:b + 1, :n]),
                  pooled_projections=torch.from_numpy(x["pooled"][b:b + 1]),
                  timestep=torch.from_numpy(x["t"][b:b + 1]), img_ids=img_ids,
                  txt_ids=torch.zeros(n, 3),
                  guidance=torch.from_numpy(x["guidance"][b:b + 1]) if guidance else None).sample
      rows.append(out[0].numpy())
  return np.stack(rows)


@pytest.fixture(scope="module")
def flux(tmp_path_factory):
  """(directory, diffusers model) of a tiny FLUX.1-dev (guidance embedding, pooled vector)."""
  model = _perturb(diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=4 * C, num_layers=1, num_single_layers=2, pooled_projection_dim=POOLED,
      guidance_embeds=True, axes_dims_rope=(4, 6, 6), **TINY), seed=0)
  path = str(tmp_path_factory.mktemp("flux"))
  model.save_pretrained(path)
  return path, model


def test_flux_parity_kontext_and_padded_text(flux):
  path, reference = flux
  cfg, model = _ours(path)
  assert (cfg.model.mmdit.variant, cfg.model.mmdit.single_depth, cfg.model.depth) == ("flux", 2, 1)
  diffusers_mmdit.load(path, model)  # patch_order="hwc": takes our (ph, pw, c) patch vectors
  x = _inputs(ref=True)
  grids = (GRID, REF)  # the reference image's tokens carry frame id 1 (Kontext)
  ours = _run_ours(model, x, grids)
  theirs = _flux_reference(reference, x, grids)
  _check_rows(_to_chw(ours), theirs, "flux (guidance, Kontext reference, padded text)")


def test_flux_without_guidance(tmp_path):
  reference = _perturb(diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=4 * C, num_layers=2, num_single_layers=1, pooled_projection_dim=POOLED,
      guidance_embeds=False, axes_dims_rope=(4, 6, 6), **TINY), seed=1)
  reference.save_pretrained(tmp_path)
  cfg, model = _ours(tmp_path)
  diffusers_mmdit.load(tmp_path, model, variant="flux", patch_order="chw")
  x = _inputs(seed=1)
  img = np.concatenate([_flux_pack(lat).numpy() for lat in x["latents"]], axis=1)  # (c, ph, pw)
  ids = model.image_ids(*GRID)
  out = np.asarray(_forward(model, jnp.asarray(img), jnp.asarray(x["txt"]), jnp.asarray(x["t"]),
                            jnp.broadcast_to(ids, (B,) + ids.shape), jnp.zeros((B, LT, 3)),
                            jnp.ones((B, ids.shape[0]), bool), jnp.asarray(x["txt_mask"]),
                            jnp.asarray(x["pooled"]), None))
  _check_rows(out, _flux_reference(reference, x, (GRID,), guidance=False), "flux (no guidance, chw)")


def _bfl_state(sd, n_double, n_single, width):
  """FluxTransformer2DModel weights in the original BFL layout (the inverse of diffusers'
  convert_flux_transformer_checkpoint_to_diffusers), written out here independently of the loader."""
  sd = {k: v.detach().clone() for k, v in sd.items()}
  out = {}
  mlp2 = lambda a, b: {f"{a}.in_layer.{p}": sd[f"{b}.linear_1.{p}"] for p in ("weight", "bias")} | {
      f"{a}.out_layer.{p}": sd[f"{b}.linear_2.{p}"] for p in ("weight", "bias")}
  out |= mlp2("time_in", "time_text_embed.timestep_embedder")
  out |= mlp2("vector_in", "time_text_embed.text_embedder")
  out |= mlp2("guidance_in", "time_text_embed.guidance_embedder")
  for p in ("weight", "bias"):
    out[f"txt_in.{p}"] = sd[f"context_embedder.{p}"]
    out[f"img_in.{p}"] = sd[f"x_embedder.{p}"]
    out[f"final_layer.linear.{p}"] = sd[f"proj_out.{p}"]
    scale, shift = sd[f"norm_out.linear.{p}"].chunk(2, dim=0)
    out[f"final_layer.adaLN_modulation.1.{p}"] = torch.cat([shift, scale])
  for i in range(n_double):
    d, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
    for p in ("weight", "bias"):
      out[f"{d}.img_mod.lin.{p}"] = sd[f"{t}.norm1.linear.{p}"]
      out[f"{d}.txt_mod.lin.{p}"] = sd[f"{t}.norm1_context.linear.{p}"]
      out[f"{d}.img_attn.qkv.{p}"] = torch.cat([sd[f"{t}.attn.to_{x}.{p}"] for x in "qkv"])
      out[f"{d}.txt_attn.qkv.{p}"] = torch.cat([sd[f"{t}.attn.add_{x}_proj.{p}"] for x in "qkv"])
      out[f"{d}.img_attn.proj.{p}"] = sd[f"{t}.attn.to_out.0.{p}"]
      out[f"{d}.txt_attn.proj.{p}"] = sd[f"{t}.attn.to_add_out.{p}"]
      for ours, theirs in (("img_mlp", "ff"), ("txt_mlp", "ff_context")):
        out[f"{d}.{ours}.0.{p}"] = sd[f"{t}.{theirs}.net.0.proj.{p}"]
        out[f"{d}.{ours}.2.{p}"] = sd[f"{t}.{theirs}.net.2.{p}"]
    for s, x in (("img", ""), ("txt", "added_")):
      out[f"{d}.{s}_attn.norm.query_norm.scale"] = sd[f"{t}.attn.norm_{x}q.weight"]
      out[f"{d}.{s}_attn.norm.key_norm.scale"] = sd[f"{t}.attn.norm_{x}k.weight"]
  for i in range(n_single):
    s, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    for p in ("weight", "bias"):
      out[f"{s}.modulation.lin.{p}"] = sd[f"{t}.norm.linear.{p}"]
      out[f"{s}.linear1.{p}"] = torch.cat([sd[f"{t}.attn.to_{x}.{p}"] for x in "qkv"]
                                          + [sd[f"{t}.proj_mlp.{p}"]])
      out[f"{s}.linear2.{p}"] = sd[f"{t}.proj_out.{p}"]
    out[f"{s}.norm.query_norm.scale"] = sd[f"{t}.attn.norm_q.weight"]
    out[f"{s}.norm.key_norm.scale"] = sd[f"{t}.attn.norm_k.weight"]
  assert sum(v.numel() for v in out.values()) == sum(v.numel() for v in sd.values())
  return out


def test_bfl_layout_bfloat16(flux, tmp_path):
  """The BFL single file (bfloat16, "model.diffusion_model." prefix) of the same weights."""
  from safetensors.torch import save_file
  path, reference = flux
  bf16 = _perturb(diffusers.FluxTransformer2DModel.from_pretrained(path), seed=0)
  with torch.no_grad():  # the weights as bfloat16 stores them
    for p in bf16.parameters():
      p.copy_(p.to(torch.bfloat16).float())
  bfl = _bfl_state(bf16.state_dict(), 1, 2, 32)
  file = str(tmp_path / "flux1-tiny.safetensors")
  save_file({f"model.diffusion_model.{k}": v.to(torch.bfloat16).contiguous()
             for k, v in bfl.items()}, file)
  cfg, model = _ours(path)
  diffusers_mmdit.load(file, model)
  x = _inputs(seed=2, ref=True)
  _check_rows(_to_chw(_run_ours(model, x, (GRID, REF))), _flux_reference(bf16, x, (GRID, REF)),
              "flux BFL layout (bfloat16 file)")


def test_export_sharded_loads_in_diffusers(flux, tmp_path):
  path, reference = flux
  cfg, model = _ours(path)
  diffusers_mmdit.load(path, model)
  out = str(tmp_path / "export")
  diffusers_mmdit.export(nnx.state(model, nnx.Param), cfg, out, max_shard_bytes=40_000)
  with open(os.path.join(out, diffusers_mmdit.INDEX)) as f:
    assert len(set(json.load(f)["weight_map"].values())) > 1
  back = diffusers.FluxTransformer2DModel.from_pretrained(out).eval()
  assert back.config.guidance_embeds and back.config.num_single_layers == 2
  theirs, again = reference.state_dict(), back.state_dict()
  assert theirs.keys() == again.keys()
  for k in theirs:
    np.testing.assert_array_equal(again[k].numpy(), theirs[k].numpy(), err_msg=k)
  x = _inputs(seed=3)  # the same weights (torch's kernels may round differently between instances)
  assert _rel(_flux_reference(back, x, (GRID,)), _flux_reference(reference, x, (GRID,))) <= 1e-5


# ------------------------------------------------------------------ SD3


@pytest.mark.parametrize("qk_norm", [None, "rms_norm"])
def test_sd3_parity(qk_norm, tmp_path):
  reference = _perturb(diffusers.SD3Transformer2DModel(
      sample_size=128, patch_size=2, in_channels=C, num_layers=2, caption_projection_dim=32,
      pooled_projection_dim=POOLED, out_channels=C, pos_embed_max_size=8, qk_norm=qk_norm, **TINY),
      seed=4)
  reference.save_pretrained(tmp_path)
  cfg, model = _ours(tmp_path)
  assert cfg.model.qk_norm == (qk_norm is not None) and cfg.model.mmdit.in_channels == 4 * C
  diffusers_mmdit.load(tmp_path, model)
  x = _inputs(seed=5)
  x["txt_mask"][:] = True
  (lat,) = x["latents"]
  ours = _run_ours(model, x, (GRID,), guidance=False)
  ours = ours.reshape(B, *GRID, 2, 2, C).transpose(0, 5, 1, 3, 2, 4).reshape(lat.shape)
  with torch.no_grad():
    theirs = reference(hidden_states=torch.from_numpy(lat),
                       encoder_hidden_states=torch.from_numpy(x["txt"]),
                       pooled_projections=torch.from_numpy(x["pooled"]),
                       timestep=torch.from_numpy(x["t"]) * 1000).sample.numpy()
  _check_rows(ours, theirs, f"sd3 (qk_norm={qk_norm})")
  if qk_norm is None:  # export: diffusers loads it (with its position table buffer)
    out = str(tmp_path / "export")
    diffusers_mmdit.export(model, cfg, out)
    back = diffusers.SD3Transformer2DModel.from_pretrained(out).eval()
    for k, v in reference.state_dict().items():
      np.testing.assert_allclose(back.state_dict()[k].numpy(), v.numpy(), rtol=0, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------ Qwen-Image


def test_qwen_parity_edit_and_padded_text(tmp_path):
  reference = _perturb(diffusers.QwenImageTransformer2DModel(
      patch_size=2, in_channels=4 * C, out_channels=C, num_layers=2, axes_dims_rope=(4, 6, 6), **TINY),
      seed=6)
  reference.save_pretrained(tmp_path)
  cfg, model = _ours(tmp_path)
  assert cfg.model.mmdit.variant == "qwen" and cfg.model.mmdit.out_channels == 4 * C
  diffusers_mmdit.load(tmp_path, model)
  x = _inputs(seed=7, ref=True)
  grids = (GRID, REF)  # an edit: the reference image is image 1 of img_shapes
  txt_ids = model.text_ids(LT, rows=[g[0] for g in grids], cols=[g[1] for g in grids])
  ours = _to_chw(_run_ours(model, x, grids, txt_ids=txt_ids, pooled=False, guidance=False))
  pack = lambda lat: QwenImagePipeline._pack_latents(torch.from_numpy(lat), B, C, *lat.shape[2:])
  hidden = torch.cat([pack(lat) for lat in x["latents"]], dim=1)
  rows = []
  with torch.no_grad():
    for b in range(B):
      n = int(x["txt_mask"][b].sum())
      rows.append(reference(hidden_states=hidden[b:b + 1],
                            encoder_hidden_states=torch.from_numpy(x["txt"][b:b + 1, :n]),
                            encoder_hidden_states_mask=torch.ones(1, n),
                            timestep=torch.from_numpy(x["t"][b:b + 1]),
                            img_shapes=[[(1, *g) for g in grids]]).sample[0].numpy())
  _check_rows(ours, np.stack(rows), "qwen (edit reference image, padded text)")


# ------------------------------------------------------------------ levers and sizes


def test_joint_mask_fits_the_flash_kernels():
  """Valid tokens see exactly the valid tokens of their row, whatever the padding pattern, and
  in the attention order (valid first) the ids keep the kernels' contract: every allowed pair
  lies in the tile ranges `mask.token_ranges` gives (padded text between text and image tokens,
  left as is, would not; the flash kernel on CPU, interpreted, agrees with XLA to 4e-7 on such
  rows but takes 10 s, so it is not run here)."""
  from unimm.kernels import mask as M
  from unimm.models.mmdit import joint_mask
  lt, li = 6, 10
  txt = np.array([np.arange(lt) < 4, np.arange(lt) >= 2, np.arange(lt) % 2 == 0])
  img = np.array([np.ones(li, bool), np.arange(li) < 7, np.arange(li) % 3 != 1])
  mask = joint_mask(jnp.asarray(txt), jnp.asarray(img))
  allowed = np.asarray(M.attention_mask(mask.ids, mask.ids))  # in attention order
  (kv_lo, kv_hi), (q_lo, q_hi) = (tuple(map(np.asarray, r)) for r in M.token_ranges(mask.ids))
  idx = np.arange(lt + li)
  assert not np.any(allowed & ~((idx >= kv_lo[..., None]) & (idx <= kv_hi[..., None])))
  assert not np.any(allowed & ~((idx[:, None] >= q_lo[:, None]) & (idx[:, None] <= q_hi[:, None])))
  restore = np.asarray(mask.restore)
  valid = np.concatenate([txt, img], axis=1)
  for b in range(len(valid)):
    joint = allowed[b][restore[b]][:, restore[b]]  # back in [txt; img] order
    np.testing.assert_array_equal(joint[valid[b]], np.broadcast_to(valid[b], joint[valid[b]].shape))


def _tiny_cfg(variant, **mmdit):
  cfg = config_lib.defaults()
  cfg.model.update(family="mmdit", width=32, heads=2, head_dim=16, depth=3, qkv_bias=True,
                   qk_norm=True, attention="xla")
  cfg.model.mmdit.update(variant=variant, context_dim=CONTEXT, axes_dims=(4, 6, 6), in_channels=16,
                         out_channels=16, **mmdit)
  return cfg


@pytest.mark.parametrize("variant, mmdit, levers", [
    ("flux", dict(single_depth=2, pooled_dim=POOLED, guidance_embed=True),
     ((False, "none"), (True, "none"), (True, "full"))),
    ("sd3", dict(pooled_dim=POOLED, pos_embed_max_size=8), ((False, "none"), (True, "none"))),
])
def test_scan_and_remat_change_nothing(variant, mmdit, levers):
  """Double blocks 0-1 scanned (sd3: block 2, context_pre_only, on its own), single blocks 0-1."""
  outs = []
  for scan, remat in levers:
    cfg = _tiny_cfg(variant, **mmdit)
    cfg.model.update(scan=scan, remat=remat)
    model = MMDiT(cfg.model, patch_dim=16, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)  # non-trivial weights: the zero-initialised modulation and head too
    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
      var.set_value(jnp.asarray(0.2 * rng.standard_normal(var.get_value().shape), jnp.float32))
    x = _inputs(seed=8)
    outs.append(_run_ours(model, x, (GRID,), guidance=variant == "flux"))
  for (scan, remat), out in zip(levers[1:], outs[1:]):
    print(f"{variant}: scan={scan} remat={remat} vs the loop: max |diff| "
          f"{np.max(np.abs(out - outs[0])):.1e}")
    np.testing.assert_allclose(out, outs[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name, count", [
    ("flux_dev", 11_901_408_320), ("flux_schnell", 11_891_178_560),
    ("sd3_medium", 2_028_328_000), ("qwen_image", 20_430_401_088)])
def test_full_size_parameter_counts(name, count):
  cfg = config_lib.load_file(os.path.join(ROOT, "configs", f"{name}.py"))
  assert cfg.model.family == "mmdit" and cfg.model.dtype == "bfloat16" and cfg.model.scan
  assert parameter_count(cfg, patch_dim=64) == count  # diffusers 0.42.1's numbers


# ------------------------------------------------------------------ errors


def test_checkpoint_errors_are_one_line(flux, tmp_path):
  from safetensors.numpy import load_file, save_file
  path, _ = flux
  cfg, model = _ours(path)
  cfg.model.mmdit.context_dim = 20  # a model whose text width differs from the checkpoint's
  small = MMDiT(cfg.model, patch_dim=0, rngs=nnx.Rngs(0))
  mismatch = r"tensor context_embedder\.weight has shape \(32, 24\) .* needs \(32, 20\)"
  with pytest.raises(UserError, match=mismatch) as e:
    diffusers_mmdit.load(path, small)
  assert "\n" not in str(e.value)
  tensors = load_file(os.path.join(path, diffusers_mmdit.WEIGHTS))
  del tensors["single_transformer_blocks.1.proj_mlp.bias"]
  broken = tmp_path / "broken"
  broken.mkdir()
  save_file(tensors, str(broken / diffusers_mmdit.WEIGHTS))
  with pytest.raises(UserError, match=r"no tensor single_transformer_blocks\.1\.proj_mlp\.bias"):
    diffusers_mmdit.load(broken, model)
  with pytest.raises(UserError, match="'sd3'"):
    diffusers_mmdit.load(path, model, variant="sd3")
  with pytest.raises(UserError, match="'UNet2DConditionModel' is not an MMDiT"):
    diffusers_mmdit.model_fields({"_class_name": "UNet2DConditionModel"})
  with pytest.raises(UserError, match="dual_attention_layers"):
    diffusers_mmdit.model_fields({"_class_name": "SD3Transformer2DModel", "pos_embed_max_size": 96,
                                  "dual_attention_layers": [0, 1]})


def test_training_starts_from_a_diffusers_checkpoint(tmp_path):
  """model.init_from (family "mmdit"): the checkpoint's fields replace the config's, its weights
  start the MMDiT of the train state; the text encoder is initialised."""
  import jax
  from unimm.train.loop import Run
  reference = _perturb(diffusers.FluxTransformer2DModel(
      patch_size=1, in_channels=192, num_layers=1, num_single_layers=1, pooled_projection_dim=32,
      guidance_embeds=False, axes_dims_rope=(4, 6, 6), num_attention_heads=2,
      attention_head_dim=16, joint_attention_dim=32), seed=2)
  reference.save_pretrained(tmp_path / "flux")
  cfg = config_lib.defaults()
  cfg.model.update(family="mmdit", width=64, heads=4, patch_size=8, init_from=str(tmp_path / "flux"))
  cfg.model.mmdit.update(edit="none", pooled_dim=32)
  cfg.model.condition.depth = 0
  cfg.data.update(image_size=16, seq_len=32, batch_size=2, docs_per_row=1)
  cfg.mesh.data = 1
  run = Run(cfg, str(tmp_path / "run"), devices=jax.devices()[:1], with_data=False)
  assert (cfg.model.width, cfg.model.heads, cfg.model.depth) == (32, 2, 1)
  params = jax.device_get(run.restore_or_init()["params"])
  want = diffusers_mmdit.load(tmp_path / "flux", params["mmdit"], "flux")
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(params["mmdit"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  w = reference.x_embedder.weight.detach().numpy()  # our (ph, pw, c) rows of its (c, ph, pw) input
  assert not np.array_equal(np.asarray(params["mmdit"]["img_in"]["kernel"]), w.T)
