"""Tiny UNet configs and a weight randomiser shared by the UNet tests (test_unet*.py)."""
from __future__ import annotations

import torch

from ldm.config import UNetConfig

# Tiny configs: two levels (32, 64 channels), attention at the 2x-downsampled level.
BASE = dict(
    image_size=8,
    in_channels=4,
    out_channels=4,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(2,),
)
CFG_ST = UNetConfig(**BASE, num_heads=2, use_spatial_transformer=True, context_dim=16)
CFG_ST_HEAD_CHANNELS = UNetConfig(
    **BASE, num_head_channels=16, use_spatial_transformer=True, context_dim=16, legacy=False
)
CFG_ATTN = UNetConfig(**BASE, num_heads=2)
CFG_UPDOWN = UNetConfig(
    **{**BASE, "in_channels": 3, "out_channels": 5, "attention_resolutions": ()},
    num_heads=1,
    resblock_updown=True,
    use_scale_shift_norm=True,
    num_classes=3,
    n_embed=7,
)


def perturb_(module: torch.nn.Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every parameter random values (also the zero-initialised ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)
