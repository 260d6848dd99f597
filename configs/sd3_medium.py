"""Stable Diffusion 3 Medium at full size (model.family="mmdit"): 2,028,328,000 parameters.

Reproduces diffusers `SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16,
num_layers=24, attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
pos_embed_max_size=192, dual_attention_layers=(), qk_norm=None)`
(stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json): 24 double-stream
blocks of width 1536, the last context_pre_only; CLIP-L/G + T5 context (4096), pooled CLIP
vector (2048); a 192 x 192 sin-cos position table instead of RoPE. The patch conv is a linear
over our (ph, pw, c) patch vectors of the 16-channel latents (64 in, 64 out).
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(family="mmdit", width=1536, heads=24, head_dim=64, depth=24, qkv_bias=True,
                 qk_norm=False, norm_eps=1e-6, dtype="bfloat16", scan=True)
  c.model.mmdit.update(variant="sd3", single_depth=0, mlp_ratio=4.0, context_dim=4096,
                       pooled_dim=2048, guidance_embed=False, pos_embed_max_size=192,
                       in_channels=64, out_channels=64)
  return c
