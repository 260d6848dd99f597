"""FLUX.1 [dev] at full size (model.family="mmdit"): 11,901,408,320 parameters.

Reproduces diffusers `FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19,
num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))`
(black-forest-labs/FLUX.1-dev transformer/config.json): 19 double-stream and 38 single-stream
blocks of width 3072, T5-XXL context (4096), CLIP-L pooled vector (768), the distilled guidance
scale embedded like t. Patch vectors are 16-channel VAE latents in 2 x 2 patches (64), in our
(ph, pw, c) order (`unimm.interop.diffusers_mmdit.load(..., patch_order="hwc")`).

Pod setting (docs/scaling.md, `python -m unimm.plan`): global batch 256 rows of one 1024 px
image each, 4096 image tokens (128 x 128 VAE latents in 2 x 2 patches; data.image_size=1024 with
16 px tokens) + 512 text tokens = 4608; blocks scanned, remat "full", all chips on fsdp.
The training path cannot build this config as it stands (the trainable text encoder is
model.width wide, not T5's 4096, and has no CLIP vector; the pixel tokenizer's patch vectors
are 768 wide, not 64): the planner runs it with model.mmdit.context_dim=0, pooled_dim=3072,
in_channels=0, out_channels=0 (a stand-in of the same token counts, +0.3B parameters).
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(family="mmdit", width=3072, heads=24, head_dim=128, depth=19, qkv_bias=True,
                 qk_norm=True, norm_eps=1e-6, rope_theta=10_000.0, dtype="bfloat16", scan=True)
  c.model.mmdit.update(variant="flux", single_depth=38, mlp_ratio=4.0, context_dim=4096,
                       pooled_dim=768, guidance_embed=True, axes_dims=(16, 56, 56),
                       pos_embed_max_size=0, in_channels=64, out_channels=64)
  c.model.update(remat="full", patch_size=16)
  c.data.update(image_size=1024, seq_len=4608, batch_size=256, docs_per_row=1)
  c.mesh.update(data=1, fsdp=-1, tensor=1, expert=1)
  return c
