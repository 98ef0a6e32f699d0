"""DPM-Solver++(2M): time grid, first step = DDIM, and the update against k-diffusion's VE form."""
import pytest
import torch

from ldm.samplers import dpm_solver_timesteps, sample_dpmpp_2m
from ldm.samplers.dpm_solver import _strictly_decreasing

T = 1000


def _eps_model(x, t):
    """Smooth, nonlinear, t-dependent stand-in for a UNet."""
    return torch.tanh(0.7 * x + torch.sin(t[:, None, None, None].double() / 150))


def kdiffusion_dpmpp_2m(eps_fn, x_T, abar, timesteps):
    """k-diffusion's sample_dpmpp_2m in VE variables: x_ve = x / alpha, sigma_ve = sigma / alpha,
    t = -log sigma_ve; the denoised value is x_ve - sigma_ve eps."""
    ab = abar[timesteps]
    alpha, sig = ab.sqrt(), ((1 - ab) / ab).sqrt()
    x = x_T / alpha[0]
    old = None
    for i in range(len(timesteps) - 1):
        t_in = torch.full((x.shape[0],), int(timesteps[i]))
        denoised = x - sig[i] * eps_fn(x * alpha[i], t_in)
        t, t_next = -sig[i].log(), -sig[i + 1].log()
        h = t_next - t
        if old is not None:
            r = (t - (-sig[i - 1].log())) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        else:
            denoised_d = denoised
        x = (sig[i + 1] / sig[i]) * x - torch.expm1(-h) * denoised_d
        old = denoised
    return x * alpha[-1]


def test_time_uniform_grid(abar):
    grid = dpm_solver_timesteps(abar, 10, "time_uniform")
    assert grid.tolist() == [999, 899, 799, 699, 599, 500, 400, 300, 200, 100, 0]


@pytest.mark.parametrize("steps", [1, 5, 10, 25, 100, 500, 999])
def test_logsnr_grid_is_strictly_decreasing_from_T_minus_1_to_0(steps, abar):
    grid = dpm_solver_timesteps(abar, steps)
    assert grid.dtype == torch.int64 and grid.shape == (steps + 1,)
    assert grid[0] == T - 1 and grid[-1] == 0
    assert (grid[:-1] > grid[1:]).all()


def test_logsnr_grid_has_equal_steps_in_lambda(abar):
    lam = 0.5 * (abar / (1 - abar)).log()
    h = lam[dpm_solver_timesteps(abar, 10)].diff()
    target = (lam[0] - lam[-1]) / 10
    # Only the rounding to integer timesteps moves the points (most near t = 0).
    assert ((h - target).abs() < 0.15 * target).all(), h


def test_strictly_decreasing_repair():
    t = torch.tensor([9, 5, 1, 1, 0, 0])
    assert _strictly_decreasing(t, 10).tolist() == [9, 5, 3, 2, 1, 0]
    assert _strictly_decreasing(torch.tensor([9, 9, 0]), 10).tolist() == [9, 8, 0]


def test_bad_arguments(abar):
    with pytest.raises(ValueError, match="logsnr, time_uniform"):
        dpm_solver_timesteps(abar, 10, "karras")
    with pytest.raises(ValueError, match="steps"):
        dpm_solver_timesteps(abar, 1000)


def test_one_step_is_ddim(abar):
    # DPM-Solver++(1) from t = T-1 to 0 is the DDIM step
    # x_0 = sqrt(abar_0) pred_x0 + sqrt(1 - abar_0) eps.
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    out = sample_dpmpp_2m(_eps_model, x, abar, 1)
    eps = _eps_model(x, torch.full((2,), T - 1))
    a, a0 = abar[-1], abar[0]
    pred_x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    torch.testing.assert_close(out, a0.sqrt() * pred_x0 + (1 - a0).sqrt() * eps,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("steps, discretization", [(20, "logsnr"), (8, "time_uniform")])
def test_equals_kdiffusion_form(steps, discretization, abar):
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sample_dpmpp_2m(_eps_model, x_T, abar, steps, lower_order_final=False,
                           discretization=discretization)
    ref = kdiffusion_dpmpp_2m(_eps_model, x_T, abar, dpm_solver_timesteps(abar, steps,
                                                                            discretization))
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)


def test_lower_order_final_below_15_steps(abar):
    # With lower_order_final the last of fewer than 15 steps is first order: it equals the
    # second-order run up to the last step, followed by a DDIM step.
    x_T = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    states = []
    lof = sample_dpmpp_2m(_eps_model, x_T, abar, 6,
                          callback=lambda i, n, x, d: states.append((x, d)))
    grid = dpm_solver_timesteps(abar, 6)
    x_last, d_last = states[-2][0], states[-1][1]
    a, a0 = abar[grid[-2]], abar[0]
    eps = (x_last - a.sqrt() * d_last) / (1 - a).sqrt()
    torch.testing.assert_close(lof, a0.sqrt() * d_last + (1 - a0).sqrt() * eps,
                               rtol=1e-10, atol=1e-10)
    no_lof = sample_dpmpp_2m(_eps_model, x_T, abar, 6, lower_order_final=False)
    assert (lof - no_lof).abs().max() > 1e-4
    # From 15 steps on the option changes nothing.
    assert torch.equal(sample_dpmpp_2m(_eps_model, x_T, abar, 15),
                       sample_dpmpp_2m(_eps_model, x_T, abar, 15, lower_order_final=False))


def test_callback_and_unet_calls(abar):
    calls, seen = [], []

    def eps_fn(x, t):
        calls.append(int(t[0]))
        return _eps_model(x, t)

    sample_dpmpp_2m(eps_fn, torch.zeros(1, 1, 2, 2, dtype=torch.float64), abar, 12,
                    callback=lambda i, n, x, d: seen.append((i, n)))
    assert seen == [(i, 12) for i in range(12)]
    assert calls == dpm_solver_timesteps(abar, 12)[:-1].tolist()
