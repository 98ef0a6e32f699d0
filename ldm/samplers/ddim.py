"""DDIM sampling (Song et al. 2021, arXiv:2010.02502), numerically as CompVis's `DDIMSampler`.

Symbols: abar_t = `alphas_cumprod[t]` (the paper's alpha_t), a_prev = abar of the previous
(less noisy) DDIM timestep, sigma_t = eta * sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)).
One step from x_t:

    pred_x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    x_prev  = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma_t^2) eps + sigma_t z

CompVis's "uniform" discretization takes every c-th training timestep, c = T // steps, shifted
by one (`range(0, T, c) + 1`), and the last step goes to abar_0, so sampling ends at t = 0,
not at the clean data. We keep all of that so that CompVis seeds reproduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.samplers.guidance import Callback, EpsFn
from ldm.samplers.noise import noise_like


def ddim_timesteps(num_train_timesteps: int, steps: int) -> Tensor:
    """CompVis `make_ddim_timesteps("uniform")`: (S,) int64, ascending, the t given to the UNet.

    range(0, T, c) + 1 with c = T // steps, so S = ceil(T / c), which exceeds `steps` when T is
    not a multiple of it (T=1000, steps=30 -> 31 steps), as in CompVis. (1000, 50) -> 1, 21, ...,
    981. Where T - 1 is a multiple of c the shift reaches t = T and CompVis fails with an
    IndexError (T=1000 with 3, 9, 27, 37, 101-111, ... or more than 500 steps); there the last
    (noisiest) step uses t = T - 1 instead, and is dropped if that repeats the one before (c = 1).
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    stride = num_train_timesteps // steps
    timesteps = torch.arange(0, num_train_timesteps, stride, dtype=torch.int64) + 1
    if int(timesteps[-1]) == num_train_timesteps:
        timesteps[-1] = num_train_timesteps - 1
        if timesteps.shape[0] > 1 and int(timesteps[-2]) == num_train_timesteps - 1:
            timesteps = timesteps[:-1]
    return timesteps


@dataclass(frozen=True)
class DDIMSchedule:
    """Per-step constants, ascending in t like CompVis's `ddim_*` buffers; all (S,)."""

    timesteps: Tensor  # int64, the t given to the UNet
    alphas: Tensor  # a_t = abar[t]
    alphas_prev: Tensor  # a_prev: abar of the previous DDIM timestep, abar[0] for the first
    sigmas: Tensor  # sigma_t (0 when eta = 0)
    sqrt_one_minus_alphas: Tensor  # sqrt(1 - a_t)


def ddim_schedule(alphas_cumprod: Tensor, steps: int, eta: float = 0.0) -> DDIMSchedule:
    """CompVis `make_ddim_sampling_parameters`, in the dtype of `alphas_cumprod` (T,).

    sigma is computed in float64 (as CompVis's numpy/torch mix does) and then cast.
    """
    timesteps = ddim_timesteps(alphas_cumprod.shape[0], steps)
    idx = timesteps.to(alphas_cumprod.device)
    alphas = alphas_cumprod[idx]
    alphas_prev = torch.cat([alphas_cumprod[:1], alphas_cumprod[idx[:-1]]])
    a, ap = alphas.double(), alphas_prev.double()
    sigmas = eta * ((1 - ap) / (1 - a) * (1 - a / ap)).sqrt()
    return DDIMSchedule(
        timesteps=timesteps,
        alphas=alphas,
        alphas_prev=alphas_prev,
        sigmas=sigmas.to(alphas.dtype),
        sqrt_one_minus_alphas=(1.0 - alphas).sqrt(),
    )


def ddim_update(
    x: Tensor, eps: Tensor, sched: DDIMSchedule, index: int, noise: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """One DDIM step at schedule position `index` -> (x_prev, pred_x0); shapes of x (B, C, H, W).

    `noise` (like x) is required when sigma > 0. Shared with PLMS, which calls it with its
    multistep eps.
    """
    dev = x.device
    a_t = sched.alphas[index].to(dev)
    a_prev = sched.alphas_prev[index].to(dev)
    sigma_t = sched.sigmas[index].to(dev)
    pred_x0 = (x - sched.sqrt_one_minus_alphas[index].to(dev) * eps) / a_t.sqrt()
    dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * eps  # direction pointing to x_t
    x_prev = a_prev.sqrt() * pred_x0 + dir_xt
    if noise is not None:
        x_prev = x_prev + sigma_t * noise
    return x_prev, pred_x0


@torch.no_grad()
def sample_ddim(
    eps_fn: EpsFn,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM from x_T (B, C, H, W) -> x_0 (B, C, H, W); eta=0 is deterministic, eta=1 is DDPM-like.

    Noise for eta > 0 is drawn from `generator` (on x_T's device; torch's global RNG if None),
    one (B, C, H, W) draw per step; with eta = 0 nothing is drawn. The number of steps taken
    (`total` in the callback) is len(ddim_timesteps(T, steps)), which can exceed `steps`.
    """
    sched = ddim_schedule(alphas_cumprod, steps, eta)
    total = sched.timesteps.shape[0]
    x = x_T
    for i in range(total):
        index = total - 1 - i
        t = torch.full((x.shape[0],), int(sched.timesteps[index]), dtype=torch.int64,
                       device=x.device)
        eps = eps_fn(x, t)
        noise = None
        if eta > 0:
            noise = noise_like(x, generator)
        x, pred_x0 = ddim_update(x, eps, sched, index, noise)
        if callback is not None:
            callback(i, total, x, pred_x0)
    return x
