"""PLMS sampling: pseudo linear multistep (Liu et al. 2022, PNDM, arXiv:2202.09778).

Numerically as CompVis's `PLMSSampler`: the DDIM timesteps and the DDIM update with eta = 0,
fed with an eps extrapolated from the raw eps of earlier steps (Adams-Bashforth):

    step 1:  eps' = (e_t + e(x', t_next)) / 2, x' = DDIM step with e_t   (pseudo improved Euler,
             one extra UNet call)
    step 2:  eps' = (3 e_t - e_1) / 2
    step 3:  eps' = (23 e_t - 16 e_1 + 5 e_2) / 12
    step 4+: eps' = (55 e_t - 59 e_1 + 37 e_2 - 9 e_3) / 24

with e_k the raw eps k steps back (not the combined eps').
"""
from __future__ import annotations

import torch
from torch import Tensor

from ldm.samplers.ddim import ddim_schedule, ddim_update
from ldm.samplers.guidance import Callback, EpsFn


def _adams_bashforth(e_t: Tensor, old: list[Tensor]) -> Tensor:
    """Combine the current eps with up to 3 earlier ones (`old[-1]` most recent)."""
    if len(old) == 1:
        return (3 * e_t - old[-1]) / 2
    if len(old) == 2:
        return (23 * e_t - 16 * old[-1] + 5 * old[-2]) / 12
    return (55 * e_t - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24


@torch.no_grad()
def sample_plms(
    eps_fn: EpsFn,
    x_T: Tensor,
    alphas_cumprod: Tensor,
    steps: int,
    *,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """PLMS from x_T (B, C, H, W) -> x_0; deterministic (`generator` unused), S+1 UNet calls.

    `eta` exists only so that a uniform option set can be passed; it must be 0, as in CompVis.
    """
    if eta != 0:
        raise ValueError("eta must be 0 for PLMS")
    sched = ddim_schedule(alphas_cumprod, steps, 0.0)
    total = sched.timesteps.shape[0]
    descending = sched.timesteps.flip(0).tolist()
    x = x_T
    old_eps: list[Tensor] = []
    for i in range(total):
        index = total - 1 - i
        t = torch.full((x.shape[0],), descending[i], dtype=torch.int64, device=x.device)
        e_t = eps_fn(x, t)
        if not old_eps:
            x_euler, _ = ddim_update(x, e_t, sched, index)
            # CompVis clamps t_next to the last timestep when there is only one step.
            t_next = torch.full_like(t, descending[min(i + 1, total - 1)])
            e_prime = (e_t + eps_fn(x_euler, t_next)) / 2
        else:
            e_prime = _adams_bashforth(e_t, old_eps)
        x, pred_x0 = ddim_update(x, e_prime, sched, index)
        old_eps.append(e_t)
        if len(old_eps) > 3:
            old_eps.pop(0)
        if callback is not None:
            callback(i, total, x, pred_x0)
    return x
