"""In-process text-to-image: prompt -> text encoder -> sampler with CFG -> VAE decode -> uint8.

This is the reference the served pipeline must match: same seed, same image. The starting
noise comes from `initial_noise(seed, ...)`, which the Triton model calls too.
"""
from __future__ import annotations

import numpy as np
import torch

from ldm.samplers import SAMPLERS, get_sampler
from ldm.samplers.guidance import Callback, cfg_denoiser


def initial_noise(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    """x_T ~ N(0, I) of `shape` (N, C, h, w) from a CPU generator seeded with `seed`.

    CPU generation keeps a seed's image identical on every device and runtime.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def latents_to_uint8(x: torch.Tensor) -> np.ndarray:
    """Decoded images (N, 3, H, W) in [-1, 1] -> (N, H, W, 3) uint8."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class Txt2ImgPipeline:
    """Wraps a `LatentDiffusion`; call it with prompts to get uint8 images."""

    def __init__(self, model):
        self.model = model.eval()
        # Non-finite values in the last call's decoded images (before uint8, where a NaN
        # becomes black): an fp16 overflow shows up here, not in the image.
        self.last_nonfinite = 0

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str],
        negative_prompt: str = "",
        steps: int = 25,
        guidance_scale: float = 5.0,
        seed: int = 0,
        sampler: str = "ddim",
        height: int | None = None,
        width: int | None = None,
        callback: Callback | None = None,
        use_ema: bool = True,
    ) -> np.ndarray:
        """(len(prompts), H, W, 3) uint8 images. x_T is drawn once for the whole batch."""
        m = self.model
        if sampler not in SAMPLERS:
            get_sampler(sampler)  # raises with the allowed names
        factor = m.first_stage_model.downsample_factor
        height = height or m.config.latent_size * factor
        width = width or m.config.latent_size * factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}")
        shape = (len(prompts), m.config.unet.in_channels, height // factor, width // factor)
        x_T = initial_noise(seed, shape)
        device = next(m.parameters()).device
        scope = m.ema_scope() if use_ema and getattr(m, "model_ema", None) is not None else _null()
        with scope:
            cond = m.get_learned_conditioning(list(prompts))
            uncond = m.get_learned_conditioning([negative_prompt]) if guidance_scale != 1 else None
            eps_fn = cfg_denoiser(m.apply_model, cond, uncond, guidance_scale,
                                  m.parameterization, m.alphas_cumprod)
            generator = torch.Generator().manual_seed(seed + 1)
            z = get_sampler(sampler)(eps_fn, x_T.to(device), m.alphas_cumprod, steps,
                                     generator=generator, callback=callback)
            images = m.decode_first_stage(z)
        self.last_nonfinite = int((~torch.isfinite(images)).sum())
        return latents_to_uint8(images)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
