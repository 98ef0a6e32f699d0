"""Tiny DDPM / LatentDiffusion configs and float64 closed forms shared by the diffusion tests
(test_diffusion.py, test_diffusion_schedule.py, test_latent_diffusion.py).

Symbols (Ho et al. 2020): betas beta_t, alphas alpha_t = 1 - beta_t, ab alpha_bar_t =
prod_{s<=t} alpha_s, ab_prev alpha_bar_{t-1} (alpha_bar_0 = 1).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from ldm.config import (
    AutoencoderConfig,
    DDConfig,
    DiffusionConfig,
    LDMConfig,
    TextEncoderConfig,
    UNetConfig,
)
from ldm.models.diffusion import DDPM

# The buffers CompVis's DDPM.register_schedule writes into a checkpoint, in registration order.
SCHEDULE_BUFFERS = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]


def tiny_unet() -> UNetConfig:
    return UNetConfig(
        image_size=16,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(1,),
        channel_mult=(1, 2),
        num_head_channels=16,
        use_spatial_transformer=True,
        context_dim=32,
    )


def tiny_ldm(**diffusion: object) -> LDMConfig:
    return LDMConfig(
        diffusion=DiffusionConfig(image_size=16, channels=4, **diffusion),  # type: ignore[arg-type]
        unet=tiny_unet(),
        first_stage=AutoencoderConfig(
            ddconfig=DDConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32),
            embed_dim=4,
        ),
        cond_stage=TextEncoderConfig(n_embed=32, n_layer=1),
    )


def closed_form_schedule(n: int = 1000, start: float = 1e-4, end: float = 2e-2) -> dict:
    """beta, alpha, alpha_bar, alpha_bar_prev in float64 for the 'linear' schedule."""
    step = (math.sqrt(end) - math.sqrt(start)) / (n - 1)
    betas = np.array([(math.sqrt(start) + i * step) ** 2 for i in range(n)])
    alphas = 1 - betas
    alpha_bar = np.cumprod(alphas)
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    return dict(betas=betas, alphas=alphas, ab=alpha_bar, ab_prev=alpha_bar_prev)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every parameter random values (the UNet's output conv starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ddpm(**kwargs: object) -> DDPM:
    return DDPM(DiffusionConfig(image_size=16, channels=4, **kwargs), tiny_unet())  # type: ignore[arg-type]


def f32(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)
