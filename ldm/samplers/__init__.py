"""Samplers: pure functions with one signature, independent of the model class.

    x_0 = sample_xxx(eps_fn, x_T, alphas_cumprod, steps, *, generator=None, callback=None, **opts)

`eps_fn(x (B, C, H, W), t (B,) int64) -> eps` comes from `cfg_denoiser` (classifier-free
guidance around a raw UNet, local or remote); `alphas_cumprod` is the model's (T,) buffer;
`x_T` is the starting noise, given explicitly so that a seed reproduces across runtimes; any
randomness comes from `generator`; `callback(i, total, x, pred_x0)` reports progress and may
raise to cancel.

Example, in process::

    eps_fn = cfg_denoiser(model.apply_model, cond, uncond, guidance_scale=5.0)
    x0 = get_sampler("ddim")(eps_fn, torch.randn(shape, generator=g), model.alphas_cumprod,
                             50, eta=0.0)
"""
from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from ldm.samplers.ddim import ddim_schedule, ddim_timesteps, sample_ddim
from ldm.samplers.ddpm import ddpm_timesteps, sample_ddpm
from ldm.samplers.dpm_solver import dpm_solver_timesteps, sample_dpmpp_2m
from ldm.samplers.guidance import Callback, EpsFn, UNetFn, cfg_denoiser, x0_to_eps
from ldm.samplers.plms import sample_plms

Sampler = Callable[..., Tensor]

SAMPLERS: dict[str, Sampler] = {
    "ddim": sample_ddim,
    "plms": sample_plms,
    "dpmpp_2m": sample_dpmpp_2m,
    "ddpm": sample_ddpm,
}


def get_sampler(name: str) -> Sampler:
    """The sampler function registered under `name`; ValueError listing the allowed names."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown sampler {name!r}; allowed: {', '.join(sorted(SAMPLERS))}"
        ) from None


__all__ = [
    "SAMPLERS",
    "Callback",
    "EpsFn",
    "Sampler",
    "UNetFn",
    "cfg_denoiser",
    "ddim_schedule",
    "ddim_timesteps",
    "ddpm_timesteps",
    "dpm_solver_timesteps",
    "get_sampler",
    "sample_ddim",
    "sample_ddpm",
    "sample_dpmpp_2m",
    "sample_plms",
    "x0_to_eps",
]
