"""Noise schedules of the forward diffusion process (Ho et al. 2020, Nichol & Dhariwal 2021).

`make_beta_schedule` reproduces CompVis `ldm.modules.diffusionmodules.util.make_beta_schedule`
bit for bit: every schedule is computed in float64 and returned as a float64 numpy array.
`schedule_arrays` derives the alpha products and posterior coefficients from it in float64, in
CompVis's `DDPM.register_schedule` operation order; `DDPM` stores them as float32 buffers.

Symbols: beta_t is the noise variance added at step t, alpha_t = 1 - beta_t and
alpha_bar_t = prod_{s<=t} alpha_s (`alphas_cumprod`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

if TYPE_CHECKING:
    from ldm.config import DiffusionConfig

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


def schedule_betas(
    given_betas: Sequence[float] | np.ndarray | None,
    beta_schedule: BetaSchedule,
    timesteps: int,
    linear_start: float,
    linear_end: float,
    cosine_s: float,
) -> np.ndarray:
    """beta_1..beta_T (float64): `given_betas` when set, else the named schedule."""
    if given_betas is not None:
        return np.asarray(given_betas, dtype=np.float64)
    return make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)


def _alphas_cumprod(betas: np.ndarray) -> np.ndarray:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s), float64."""
    return np.cumprod(1.0 - betas, axis=0)


def alphas_cumprod(cfg: DiffusionConfig) -> np.ndarray:
    """alpha_bar_t of a diffusion config as float64, shape (T,).

    Equal, once cast to float32, to the `alphas_cumprod` buffer of a `DDPM` built from `cfg`.
    """
    betas = schedule_betas(
        cfg.given_betas, cfg.beta_schedule, cfg.timesteps,
        cfg.linear_start, cfg.linear_end, cfg.cosine_s,
    )
    return _alphas_cumprod(betas)


def schedule_arrays(betas: np.ndarray, v_posterior: float) -> dict[str, np.ndarray]:
    """The schedule buffers of CompVis `DDPM.register_schedule`, float64, in its order.

    betas: (T,) float64. v_posterior = v picks the reverse-process variance
    sigma_t^2 = (1 - v) beta_tilde_t + v beta_t (Ho et al. sec. 3.2). Every expression keeps
    CompVis's operation order, so the float32 buffers made from them match its bit for bit.
    """
    alphas = 1.0 - betas
    acp = _alphas_cumprod(betas)  # alpha_bar_t
    acp_prev = np.append(1.0, acp[:-1])  # alpha_bar_{t-1}, with alpha_bar_0 = 1
    # q(x_{t-1} | x_t, x_0), Ho et al. eq. 7: beta_tilde_t and the mean's coefficients.
    posterior_variance = (1 - v_posterior) * betas * (1.0 - acp_prev) / (
        1.0 - acp
    ) + v_posterior * betas
    return {
        "betas": betas,
        "alphas_cumprod": acp,
        "alphas_cumprod_prev": acp_prev,
        # q(x_t | x_0) and its inversion x_0 = x_t / sqrt(alpha_bar) - sqrt(1/alpha_bar - 1) eps
        "sqrt_alphas_cumprod": np.sqrt(acp),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - acp),
        "log_one_minus_alphas_cumprod": np.log(1.0 - acp),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / acp),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / acp - 1),
        "posterior_variance": posterior_variance,
        # beta_tilde_0 = 0, so the log is clipped.
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp_prev) / (1.0 - acp),
        "posterior_mean_coef2": (1.0 - acp_prev) * np.sqrt(alphas) / (1.0 - acp),
    }


def extract_into_tensor(a: torch.Tensor, t: torch.Tensor, x_shape: torch.Size) -> torch.Tensor:
    """Gather per-timestep coefficients `a[t]` shaped to broadcast against x.

    a: (T,), t: (B,) long, x_shape: (B, ...) -> (B, 1, ..., 1).
    """
    out = a.gather(-1, t.to(a.device))
    return out.reshape(t.shape[0], *((1,) * (len(x_shape) - 1)))
