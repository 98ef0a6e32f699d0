"""Noise schedules of the forward diffusion process (Ho et al. 2020, Nichol & Dhariwal 2021).

`make_beta_schedule` reproduces CompVis `ldm.modules.diffusionmodules.util.make_beta_schedule`
bit for bit: every schedule is computed in float64 and returned as a float64 numpy array; the
callers (`DDPM.register_schedule`) derive the alpha products in float64 and store float32 buffers.

Symbols: beta_t is the noise variance added at step t, alpha_t = 1 - beta_t and
alpha_bar_t = prod_{s<=t} alpha_s (`alphas_cumprod`).
"""
from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

BetaSchedule = Literal["linear", "cosine", "sqrt_linear", "sqrt"]
BETA_SCHEDULES: tuple[str, ...] = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_beta_schedule(
    schedule: BetaSchedule,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """beta_1..beta_T as a float64 array of shape (n_timestep,).

    - "linear": sqrt(beta) linear from sqrt(linear_start) to sqrt(linear_end) (the LDM/SD
      "scaled linear" schedule, despite the name).
    - "cosine": Nichol & Dhariwal eq. 17, alpha_bar(t) = cos^2((t/T + s) / (1 + s) * pi/2),
      beta_t = 1 - alpha_bar(t) / alpha_bar(t-1) clipped to [0, 0.999].
    - "sqrt_linear": beta linear from linear_start to linear_end (CompVis's name, kept).
    - "sqrt": sqrt of that linear ramp.
    """
    if schedule == "linear":
        # torch.linspace (not numpy) so the float64 grid matches CompVis's to the last bit.
        ramp = torch.linspace(linear_start**0.5, linear_end**0.5, n_timestep, dtype=torch.float64)
        betas = ramp**2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alpha_bar = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(min=0.0, max=0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r} (allowed: {list(BETA_SCHEDULES)})")
    return betas.numpy()


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather per-timestep coefficients `a[t]` shaped to broadcast against x.

    a: (T,), t: (B,) long, x_shape: (B, ...) -> (B, 1, ..., 1).
    """
    out = a.gather(-1, t.to(a.device))
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))
