"""ODE samplers against the closed-form probability-flow ODE of a Gaussian data distribution.

For data x_0 ~ N(mu, s^2) (per channel) and x_t = alpha x_0 + sigma eps (alpha^2 = abar_t,
sigma^2 = 1 - abar_t), x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2) and the exact eps is

    E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2).

The probability-flow ODE keeps the standardized value fixed, so it maps x at abar_a to

    x_b = alpha_b mu + sqrt((abar_b s^2 + 1 - abar_b) / (abar_a s^2 + 1 - abar_a))
                       * (x_a - alpha_a mu).

(Derivation: with y = x / alpha and r = sigma / alpha the ODE is dy/dr = eps = r (y - mu) /
(s^2 + r^2), so y - mu is proportional to sqrt(s^2 + r^2).)
"""
import pytest
import torch

from ldm.samplers import ddim_timesteps, sample_ddim, sample_dpmpp_2m, sample_plms

T = 1000
BETAS = torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2
ABAR = torch.cumprod(1 - BETAS, 0)
MU = torch.tensor([0.5, -1.0, 0.2, 1.5], dtype=torch.float64).view(1, 4, 1, 1)
S = torch.tensor([0.3, 0.8, 1.2, 0.5], dtype=torch.float64).view(1, 4, 1, 1)


def exact_eps(x, t):
    a = ABAR[t].view(-1, 1, 1, 1)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)


def exact_flow(x, abar_from, abar_to):
    scale = ((abar_to * S**2 + 1 - abar_to) / (abar_from * S**2 + 1 - abar_from)).sqrt()
    return abar_to.sqrt() * MU + scale * (x - abar_from.sqrt() * MU)


@pytest.fixture
def x_T():
    return torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)


def ddim_like_error(sampler, x_T, steps):
    """CompVis's DDIM/PLMS start at the noisiest DDIM timestep and end at abar_0."""
    start = ddim_timesteps(T, steps)[-1]
    out = sampler(exact_eps, x_T, ABAR, steps)
    return (out - exact_flow(x_T, ABAR[start], ABAR[0])).abs().max().item()


def dpm_error(x_T, steps, **opts):
    out = sample_dpmpp_2m(exact_eps, x_T, ABAR, steps, **opts)
    return (out - exact_flow(x_T, ABAR[-1], ABAR[0])).abs().max().item()


def test_exact_flow_is_a_fixed_point_of_fine_ddim(x_T):
    # Sanity check of the closed form itself: DDIM on all 999 timesteps converges to it
    # (the solution moves by ~3 while the error is first order in the step).
    assert ddim_like_error(sample_ddim, x_T, 1000) < 0.01
    move = (exact_flow(x_T, ABAR[-1], ABAR[0]) - x_T).abs().max()
    assert move > 2.0


def test_ddim_25_steps_close_and_first_order(x_T):
    err25 = ddim_like_error(sample_ddim, x_T, 25)
    err100 = ddim_like_error(sample_ddim, x_T, 100)
    assert err25 < 0.25
    assert err100 < err25 / 3  # first order: 4x the steps, ~1/4 the error


def test_plms_25_steps_close(x_T):
    assert ddim_like_error(sample_plms, x_T, 25) < 0.05
    assert ddim_like_error(sample_plms, x_T, 20) < 0.06


def test_dpmpp_2m_20_steps_close(x_T):
    assert dpm_error(x_T, 20) < 0.03
    assert dpm_error(x_T, 25) < 0.02


def test_dpmpp_2m_beats_ddim_at_10_steps(x_T):
    ddim10 = ddim_like_error(sample_ddim, x_T, 10)
    dpm10 = dpm_error(x_T, 10)
    assert dpm10 < 0.1
    assert dpm10 < 0.3 * ddim10, (dpm10, ddim10)


def test_dpmpp_2m_second_order(x_T):
    # Doubling 20 -> 40 steps cuts the error by more than first order would (2x).
    assert dpm_error(x_T, 40) < dpm_error(x_T, 20) / 3
