"""Qwen-Image at full size (model.family="mmdit"): 20,430,401,088 parameters.

Reproduces diffusers `QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16,
num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
guidance_embeds=False, axes_dims_rope=(16, 56, 56))` (Qwen/Qwen-Image transformer/config.json):
60 double-stream blocks of width 3072 with QK RMSNorm, RMSNorm'd Qwen2.5-VL-7B hidden states as
context (3584), no pooled vector, MSRoPE. Patch vectors are 16-channel latents in 2 x 2 patches
(64 in, 64 out), in our (ph, pw, c) order.
"""

from unimm.config import defaults


def get_config():
  c = defaults()
  c.model.update(family="mmdit", width=3072, heads=24, head_dim=128, depth=60, qkv_bias=True,
                 qk_norm=True, norm_eps=1e-6, rope_theta=10_000.0, dtype="bfloat16", scan=True)
  c.model.mmdit.update(variant="qwen", single_depth=0, mlp_ratio=4.0, context_dim=3584,
                       pooled_dim=0, guidance_embed=False, axes_dims=(16, 56, 56),
                       pos_embed_max_size=0, in_channels=64, out_channels=64)
  return c
