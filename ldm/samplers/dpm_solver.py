"""DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) on the discrete schedule.

Noise levels from the training schedule abar = `alphas_cumprod`: alpha_t = sqrt(abar_t),
sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) (half the log-SNR). The solver
works with the data prediction D_i = (x_{t_i} - sigma_i eps) / alpha_i and, with
h_i = lambda_{i+1} - lambda_i and r = h_{i-1} / h_i, steps

    x_{i+1} = (sigma_{i+1} / sigma_i) x_i - alpha_{i+1} (exp(-h_i) - 1) D'
    D' = (1 + 1 / (2r)) D_i - 1 / (2r) D_{i-1}     (second order, multistep)
    D' = D_i                                       (first step; = DDIM, "DPM-Solver++(1)")

Time steps (`discretization`): by default uniform in lambda from t = T-1 to t = 0, each point
moved to the nearest integer timestep (the UNet was trained on integer t; an ONNX UNet takes
int64), so the steps h_i are about equal, which is what the solver's error bound wants. With
CompVis's linear schedule, uniform-in-t spacing ("time_uniform", diffusers' "linspace") makes the
last step h ~ 1.5 in lambda and costs about 10x the error on a Gaussian test distribution.
Sampling ends at t = 0 (abar_0), where CompVis's DDIM also ends. With few steps (< 15) the last
step is first order ("lower_order_final", as diffusers).
"""
from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from ldm.samplers.guidance import Callback, EpsFn

Discretization = Literal["logsnr", "time_uniform"]
DISCRETIZATIONS: tuple[str, ...] = ("logsnr", "time_uniform")


def _strictly_decreasing(t: Tensor, num_train_timesteps: int) -> Tensor:
    """Nudge a non-increasing integer grid t_0 >= ... >= t_N = 0 to a strictly decreasing one.

    Rounding to integer timesteps merges neighbours where the target grid is denser than 1
    (near t = 0 for logSNR spacing); each merged point is pushed up just enough, within [0, T-1].
    """
    n = t.shape[0] - 1
    room = n - torch.arange(n + 1)  # t_i >= n - i is forced by strictness above t_n = 0
    slack = (t - room).flip(0).cummax(0).values.flip(0)  # suffix max: non-increasing
    return slack.clamp(max=num_train_timesteps - 1 - n) + room


def dpm_solver_timesteps(
    alphas_cumprod: Tensor, steps: int, discretization: Discretization = "logsnr"
) -> Tensor:
    """(steps + 1,) int64 timesteps, strictly descending from T-1 to 0 (where sampling ends).

    "logsnr": lambda uniform between lambda(T-1) and lambda(0), each point at the nearest integer
    timestep (DPM-Solver's recommended spacing; the steps h_i are then about equal).
    "time_uniform": round(linspace(T-1, 0, steps+1)) (diffusers' "linspace" spacing).
    """
    num_t = alphas_cumprod.shape[0]
    if not 1 <= steps < num_t:
        raise ValueError(f"steps must be in [1, {num_t - 1}], got {steps}")
    if discretization == "time_uniform":
        grid = torch.linspace(num_t - 1, 0, steps + 1, dtype=torch.float64).round().long()
    elif discretization == "logsnr":
        lam = half_log_snr(alphas_cumprod.double().cpu())
        targets = torch.linspace(float(lam[-1]), float(lam[0]), steps + 1, dtype=torch.float64)
        grid = (lam[None, :] - targets[:, None]).abs().argmin(dim=1)
    else:
        raise ValueError(
            f"unknown discretization {discretization!r}; allowed: {', '.join(DISCRETIZATIONS)}"
        )
    return _strictly_decreasing(grid, num_t)


def half_log_snr(alphas_cumprod: Tensor) -> Tensor:
    """lambda_t = log(alpha_t / sigma_t) = 0.5 log(abar_t / (1 - abar_t)); (T,) -> (T,)."""
    return 0.5 * (alphas_cumprod.log() - torch.log1p(-alphas_cumprod))


@torch.no_grad()
def sample_dpmpp_2m(
    eps_fn: EpsFn,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    lower_order_final: bool = True,
    discretization: Discretization = "logsnr",
) -> Tensor:
    """DPM-Solver++(2M) from x_T (B, C, H, W) at t = T-1 to x at t = 0; `steps` UNet calls.

    Deterministic (`generator` unused). `lower_order_final` makes the last step first order
    when steps < 15.
    """
    timesteps = dpm_solver_timesteps(alphas_cumprod, steps, discretization)
    abar = alphas_cumprod.double().cpu()[timesteps]
    alpha, sigma = abar.sqrt().tolist(), (1 - abar).sqrt().tolist()
    lam = half_log_snr(abar).tolist()

    x = x_T
    d_prev: Tensor | None = None
    for i in range(steps):
        t = torch.full((x.shape[0],), int(timesteps[i]), dtype=torch.int64, device=x.device)
        eps = eps_fn(x, t)
        d = (x - sigma[i] * eps) / alpha[i]
        h = lam[i + 1] - lam[i]
        final_first_order = lower_order_final and steps < 15 and i == steps - 1
        if d_prev is None or final_first_order:
            d_hat = d
        else:
            r = (lam[i] - lam[i - 1]) / h
            d_hat = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * d_prev
        x = (sigma[i + 1] / sigma[i]) * x - (alpha[i + 1] * math.expm1(-h)) * d_hat
        d_prev = d
        if callback is not None:
            callback(i, steps, x, d)
    return x
