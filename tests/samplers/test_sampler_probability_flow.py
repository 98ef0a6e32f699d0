"""ODE samplers against the closed-form probability-flow ODE of a Gaussian data distribution.

For data x_0 ~ N(mu, s^2) (per channel; the `gaussian_data` fixture) and
x_t = alpha x_0 + sigma eps (alpha^2 = abar_t, sigma^2 = 1 - abar_t),
x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2) and the exact eps is

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


@pytest.fixture
def x_T():
    return torch.randn(8, 4, 6, 6, generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64)


@pytest.fixture
def ddim_like_error(abar, gaussian_data):
    """(sampler, x_T, steps) -> largest distance of a DDIM-like sampler's output (run on the
    exact eps) from the exact flow of x_T."""
    exact_eps = gaussian_data.eps_fn(abar)

    def error(sampler, x_T, steps):
        # CompVis's DDIM/PLMS start at the noisiest DDIM timestep and end at abar_0.
        start = ddim_timesteps(T, steps)[-1]
        out = sampler(exact_eps, x_T, abar, steps)
        return (out - gaussian_data.flow(x_T, abar[start], abar[0])).abs().max().item()

    return error


@pytest.fixture
def dpm_error(abar, gaussian_data):
    """(x_T, steps, **opts) -> the same for DPM-Solver++(2M), which runs from abar_{T-1}."""
    exact_eps = gaussian_data.eps_fn(abar)

    def error(x_T, steps, **opts):
        out = sample_dpmpp_2m(exact_eps, x_T, abar, steps, **opts)
        return (out - gaussian_data.flow(x_T, abar[-1], abar[0])).abs().max().item()

    return error


def test_exact_flow_is_a_fixed_point_of_fine_ddim(x_T, ddim_like_error, abar, gaussian_data):
    # Sanity check of the closed form itself: DDIM on all 999 timesteps converges to it
    # (the solution moves by ~3 while the error is first order in the step).
    assert ddim_like_error(sample_ddim, x_T, 1000) < 0.01
    move = (gaussian_data.flow(x_T, abar[-1], abar[0]) - x_T).abs().max()
    assert move > 2.0


def test_ddim_25_steps_close_and_first_order(x_T, ddim_like_error):
    err25 = ddim_like_error(sample_ddim, x_T, 25)
    err100 = ddim_like_error(sample_ddim, x_T, 100)
    assert err25 < 0.25
    assert err100 < err25 / 3  # first order: 4x the steps, ~1/4 the error


def test_plms_25_steps_close(x_T, ddim_like_error):
    assert ddim_like_error(sample_plms, x_T, 25) < 0.05
    assert ddim_like_error(sample_plms, x_T, 20) < 0.06


def test_dpmpp_2m_20_steps_close(x_T, dpm_error):
    assert dpm_error(x_T, 20) < 0.03
    assert dpm_error(x_T, 25) < 0.02


def test_dpmpp_2m_beats_ddim_at_10_steps(x_T, ddim_like_error, dpm_error):
    ddim10 = ddim_like_error(sample_ddim, x_T, 10)
    dpm10 = dpm_error(x_T, 10)
    assert dpm10 < 0.1
    assert dpm10 < 0.3 * ddim10, (dpm10, ddim10)


def test_dpmpp_2m_second_order(x_T, dpm_error):
    # Doubling 20 -> 40 steps cuts the error by more than first order would (2x).
    assert dpm_error(x_T, 40) < dpm_error(x_T, 20) / 3
