"""The one interface every sampler sees: `eps_fn(x, t) -> eps`, and classifier-free guidance.

Samplers never touch `LatentDiffusion`: they get an `EpsFn`, built here from a raw `UNetFn`
that may be the in-process PyTorch UNet (`lambda x, t, c: model.apply_model(x, t, c)`) or a
remote ONNX/TensorRT model called from a Triton Python-backend model.

Classifier-free guidance (Ho & Salimans 2022), CompVis order (`c_in = cat([uncond, cond])`):

    eps = eps_u + s * (eps_c - eps_u)
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

# Raw UNet: x (N, C, H, W), t (N,) int64 timesteps, context (N, L, D) or None -> (N, C, H, W),
# in the model's own parameterization (eps or x0).
UNetFn = Callable[[Tensor, Tensor, Tensor | None], Tensor]
# What the samplers call: x_t (B, C, H, W), t (B,) int64 -> eps (B, C, H, W).
EpsFn = Callable[[Tensor, Tensor], Tensor]
# Progress hook: (step_index, total_steps, x after the step, predicted x_0 at the step).
# Its return value is ignored; raising from it cancels sampling.
Callback = Callable[[int, int, Tensor, Tensor], object]

Parameterization = Literal["eps", "x0"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0")


def _expand_batch(c: Tensor, batch: int, name: str) -> Tensor:
    """(1 or B, L, D) -> (B, L, D)."""
    if c.shape[0] == batch:
        return c
    if c.shape[0] == 1:
        return c.expand(batch, *c.shape[1:])
    raise ValueError(f"{name} has batch {c.shape[0]}, expected 1 or {batch}")


def x0_to_eps(x: Tensor, t: Tensor, x0: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """eps = (x_t - sqrt(abar_t) x_0) / sqrt(1 - abar_t), inverting the forward process
    x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps.

    x, x0: (B, C, H, W); t: (B,) int64; alphas_cumprod: (T,) abar.
    """
    abar = alphas_cumprod.to(device=x.device)[t].to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
    return (x - abar.sqrt() * x0) / (1 - abar).sqrt()


def cfg_denoiser(
    unet_fn: UNetFn,
    cond: Tensor | None,
    uncond: Tensor | None = None,
    guidance_scale: float = 1.0,
    parameterization: Parameterization = "eps",
    alphas_cumprod: Tensor | None = None,
) -> EpsFn:
    """Wrap a raw UNet into an `EpsFn` with classifier-free guidance.

    cond: (1 or B, L, D) prompt embedding (None for unconditional models); uncond: (1 or B, L, D)
    empty-prompt or negative-prompt embedding. With guidance (`uncond` given and
    `guidance_scale != 1`) the UNet is called ONCE on a batch of 2B: x and t duplicated, context
    `cat([uncond, cond])`, the output split into (eps_u, eps_c) as CompVis's DDIMSampler does.
    Otherwise it is called once on B with `cond` only. x0-parameterized models are converted to
    eps with `alphas_cumprod` (T,); the conversion is affine in the UNet output for fixed x_t, so
    guiding x0 then converting equals converting then guiding.
    """
    if parameterization not in PARAMETERIZATIONS:
        allowed = ", ".join(PARAMETERIZATIONS)
        raise ValueError(f"unknown parameterization {parameterization!r}; allowed: {allowed}")
    if parameterization == "x0" and alphas_cumprod is None:
        raise ValueError("parameterization 'x0' needs alphas_cumprod to convert x0 to eps")
    guided = uncond is not None and guidance_scale != 1.0
    if guided and cond is None:
        raise ValueError("classifier-free guidance needs a conditioning `cond`")

    def eps_fn(x: Tensor, t: Tensor) -> Tensor:
        batch = x.shape[0]
        c = None if cond is None else _expand_batch(cond, batch, "cond")
        if guided:
            u = _expand_batch(uncond, batch, "uncond")
            out_u, out_c = unet_fn(
                torch.cat([x, x]), torch.cat([t, t]), torch.cat([u, c])
            ).chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        else:
            out = unet_fn(x, t, c)
        if parameterization == "x0":
            out = x0_to_eps(x, t, out, alphas_cumprod)
        return out

    return eps_fn
