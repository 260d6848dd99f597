"""FLUX.1 [dev] at full size (model.family="mmdit"): 11,901,408,320 parameters.

Reproduces diffusers `FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=19,
num_single_layers=38, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))`
(black-forest-labs/FLUX.1-dev transformer/config.json): 19 double-stream and 38 single-stream
blocks of width 3072, T5-XXL context (4096), CLIP-L pooled vector (768), the distilled guidance
scale embedded like t. Patch vectors are 16-channel VAE latents in 2 x 2 patches (64), in our
(ph, pw, c) order (`unimm.interop.diffusers_mmdit.load(..., patch_order="hwc")`).
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(family="mmdit", width=3072, heads=24, head_dim=128, depth=19, qkv_bias=True,
                 qk_norm=True, norm_eps=1e-6, rope_theta=10_000.0, dtype="bfloat16", scan=True)
  c.model.mmdit.update(variant="flux", single_depth=38, mlp_ratio=4.0, context_dim=4096,
                       pooled_dim=768, guidance_embed=True, axes_dims=(16, 56, 56),
                       pos_embed_max_size=0, in_channels=64, out_channels=64)
  return c
