"""Ancestral DDPM sampling (Ho et al. 2020, arXiv:2006.11239), optionally on fewer steps.

With kept timesteps t_0 = 0 < t_1 < ... < t_{S-1} = T - 1 the chain is respaced as in
improved-DDPM (Nichol & Dhariwal 2021, `SpacedDiffusion`): abar_k = abar[t_k], abar_{-1} = 1,
beta_k = 1 - abar_k / abar_{k-1}. Each step samples the Gaussian posterior q(x_{k-1} | x_k, x_0)
at the predicted x_0 (the "fixed small" variance beta~_k):

    pred_x0 = sqrt(1 / abar_k) x_k - sqrt(1 / abar_k - 1) eps(x_k, t_k)
    x_{k-1} = c0 pred_x0 + ck x_k + sqrt(beta~_k) z,  z ~ N(0, I), no noise at k = 0
    c0 = beta_k sqrt(abar_{k-1}) / (1 - abar_k)
    ck = (1 - abar_{k-1}) sqrt(1 - beta_k) / (1 - abar_k)
    beta~_k = beta_k (1 - abar_{k-1}) / (1 - abar_k)

The UNet always gets the original timestep t_k. With S = T this is CompVis `LatentDiffusion`'s
`p_sample_loop`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ldm.samplers.guidance import Callback, EpsFn
from ldm.samplers.noise import noise_like


def ddpm_timesteps(num_train_timesteps: int, steps: int) -> Tensor:
    """(S,) int64 ascending, evenly spaced from 0 to T-1 and rounded.

    improved-DDPM's `space_timesteps(T, [steps])`; all T timesteps when steps == T.
    """
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be in [1, {num_train_timesteps}], got {steps}")
    if steps == 1:
        return torch.tensor([num_train_timesteps - 1], dtype=torch.int64)
    return torch.linspace(0, num_train_timesteps - 1, steps, dtype=torch.float64).round().long()


@torch.no_grad()
def sample_ddpm(
    eps_fn: EpsFn,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    clip_denoised: bool = False,
    v_posterior: float = 0.0,
) -> Tensor:
    """Ancestral sampling x_T (B, C, H, W) -> x_0 on `steps` of the T training timesteps.

    `clip_denoised` clamps pred_x0 to [-1, 1]: right for pixels, off for latents (CompVis
    `LatentDiffusion` sets clip_denoised=False). `v_posterior` (CompVis's name) mixes in the
    "fixed large" variance: (1 - v) beta~ + v beta. Noise comes from `generator` (torch's
    global RNG if None), one (B, C, H, W) draw per step except the last.
    """
    timesteps = ddpm_timesteps(alphas_cumprod.shape[0], steps)
    abar = alphas_cumprod.double().cpu()[timesteps]
    abar_prev = torch.cat([abar.new_ones(1), abar[:-1]])
    betas = 1 - abar / abar_prev
    # Per-step constants in float64 (CompVis computes its posterior buffers in numpy float64).
    sqrt_recip = (1 / abar).sqrt()
    sqrt_recipm1 = (1 / abar - 1).sqrt()
    coef_x0 = betas * abar_prev.sqrt() / (1 - abar)
    coef_xt = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    posterior_var = betas * (1 - abar_prev) / (1 - abar)
    sigma = ((1 - v_posterior) * posterior_var + v_posterior * betas).sqrt()
    consts = [c.tolist() for c in (sqrt_recip, sqrt_recipm1, coef_x0, coef_xt, sigma)]

    total = timesteps.shape[0]
    x = x_T
    for i in range(total):
        k = total - 1 - i
        t = torch.full((x.shape[0],), int(timesteps[k]), dtype=torch.int64, device=x.device)
        eps = eps_fn(x, t)
        s_recip, s_recipm1, c0, ck, sig = (c[k] for c in consts)
        pred_x0 = s_recip * x - s_recipm1 * eps
        if clip_denoised:
            pred_x0 = pred_x0.clamp(-1.0, 1.0)
        x = c0 * pred_x0 + ck * x
        if k > 0:
            x = x + sig * noise_like(x, generator)
        if callback is not None:
            callback(i, total, x, pred_x0)
    return x
