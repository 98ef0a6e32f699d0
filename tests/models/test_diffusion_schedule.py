"""DDPM's schedule buffers against closed forms (Ho et al. 2020) and CompVis's buffer layout.

Every expected value here is computed independently in the test (numpy float64 closed forms,
or the UNet called directly), never read back from the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.models.diffusion_helpers import SCHEDULE_BUFFERS, closed_form_schedule, ddpm, f32

# --- schedule buffers -------------------------------------------------------------------


def test_schedule_buffers_names_dtypes_and_persistence() -> None:
    m = ddpm()
    persistent = [k for k in m.state_dict() if "." not in k]
    assert persistent == SCHEDULE_BUFFERS
    buffers = dict(m.named_buffers())
    assert "lvlb_weights" in buffers and "lvlb_weights" not in m.state_dict()
    for name in [*SCHEDULE_BUFFERS, "lvlb_weights"]:
        assert buffers[name].dtype == torch.float32 and buffers[name].shape == (1000,), name
    # logvar: a plain tensor, neither parameter nor buffer, unless learned.
    assert isinstance(m.logvar, torch.Tensor) and not isinstance(m.logvar, torch.nn.Parameter)
    assert "logvar" not in dict(m.named_parameters()) and m.num_timesteps == 1000
    assert torch.equal(m.logvar, torch.zeros(1000))


def test_learned_logvar_is_a_parameter_in_the_state_dict() -> None:
    m = ddpm(learn_logvar=True, logvar_init=-0.5)
    assert isinstance(m.logvar, torch.nn.Parameter) and m.logvar.requires_grad
    assert list(m.state_dict())[0] == "logvar"
    assert torch.equal(m.state_dict()["logvar"], torch.full((1000,), -0.5))


def test_schedule_buffers_match_closed_forms() -> None:
    m = ddpm()
    s = closed_form_schedule()
    ab, ab_prev = s["ab"], s["ab_prev"]
    expected = {
        "betas": s["betas"],
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": np.sqrt(ab),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ab),
        "log_one_minus_alphas_cumprod": np.log(1 - ab),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ab),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1 - ab) / ab),
    }
    for name, value in expected.items():
        # float32 storage of a float64 computation: equal to float32 rounding.
        torch.testing.assert_close(getattr(m, name), f32(value), rtol=2e-6, atol=0, msg=name)


def test_posterior_matches_ho_et_al_eq_7_and_bayes_rule() -> None:
    m = ddpm()
    s = closed_form_schedule()
    b, a, ab, ab_prev = s["betas"], s["alphas"], s["ab"], s["ab_prev"]
    # Eq. 7: mu_tilde = sqrt(ab_{t-1}) b_t / (1 - ab_t) x_0
    #                  + sqrt(a_t) (1 - ab_{t-1}) / (1 - ab_t) x_t
    torch.testing.assert_close(m.posterior_mean_coef1, f32(np.sqrt(ab_prev) * b / (1 - ab)))
    torch.testing.assert_close(m.posterior_mean_coef2, f32(np.sqrt(a) * (1 - ab_prev) / (1 - ab)))
    beta_tilde = (1 - ab_prev) / (1 - ab) * b
    torch.testing.assert_close(m.posterior_variance, f32(beta_tilde))
    assert m.posterior_variance[0] == 0
    # Bayes: q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x_0,
    # 1 - ab_{t-1}); precision and mean of that product, for t >= 1.
    precision = 1 / (1 - ab_prev[1:]) + a[1:] / b[1:]
    torch.testing.assert_close(m.posterior_variance[1:], f32(1 / precision))
    log_clipped = np.log(np.concatenate([[1e-20], beta_tilde[1:]]))
    torch.testing.assert_close(m.posterior_log_variance_clipped, f32(log_clipped))

    x0, xt = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([1, 500, 999])
    mean, var, logvar = m.q_posterior(x0, xt, t)
    tn = t.numpy()
    w0 = np.sqrt(ab_prev[tn]) / (1 - ab_prev[tn]) / precision[tn - 1]
    wt = np.sqrt(a[tn]) / b[tn] / precision[tn - 1]
    expected = f32(w0)[:, None, None, None] * x0 + f32(wt)[:, None, None, None] * xt
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)
    assert var.shape == (3, 1, 1, 1) and logvar.shape == (3, 1, 1, 1)


def test_v_posterior_blends_beta_tilde_and_beta() -> None:
    m = ddpm(v_posterior=0.3)
    s = closed_form_schedule()
    beta_tilde = (1 - s["ab_prev"]) / (1 - s["ab"]) * s["betas"]
    torch.testing.assert_close(m.posterior_variance, f32(0.7 * beta_tilde + 0.3 * s["betas"]))


def test_lvlb_weights_eps_parameterisation() -> None:
    m = ddpm(parameterization="eps")
    s = closed_form_schedule()
    beta_tilde = (1 - s["ab_prev"]) / (1 - s["ab"]) * s["betas"]
    with np.errstate(divide="ignore"):
        w = s["betas"] ** 2 / (2 * beta_tilde * s["alphas"] * (1 - s["ab"]))
    w[0] = w[1]
    # CompVis evaluates this in float32 from the float32 buffers; 1 - alpha_bar_t cancels for
    # small t, so it agrees with the float64 value to ~1e-4 only...
    torch.testing.assert_close(m.lvlb_weights, f32(w), rtol=2e-4, atol=0)
    # ...and exactly with the same formula on float32 inputs.
    b32, a32, ab32 = f32(s["betas"]), f32(s["alphas"]), f32(s["ab"])
    w32 = b32**2 / (2 * f32(beta_tilde) * a32 * (1 - ab32))
    w32[0] = w32[1]
    assert torch.equal(m.lvlb_weights, w32)


def test_lvlb_weights_x0_parameterisation_keeps_compvis_formula() -> None:
    m = ddpm(parameterization="x0")
    ab = closed_form_schedule()["ab"]
    w = 0.5 * np.sqrt(ab) / (2.0 - ab)  # CompVis: `(2. * 1 - alphas_cumprod)`
    w[0] = w[1]
    torch.testing.assert_close(m.lvlb_weights, f32(w), rtol=1e-6, atol=0)
    # Bit-exact with CompVis's float32 evaluation (numpy's sqrt on float32 alpha_bar).
    ab32 = ab.astype(np.float32)
    w32 = np.float32(0.5) * np.sqrt(ab32) / (np.float32(2.0) - ab32)
    w32[0] = w32[1]
    assert torch.equal(m.lvlb_weights, torch.from_numpy(w32))


def test_given_betas_override_the_schedule() -> None:
    betas = (0.1, 0.2, 0.3, 0.4)
    m = ddpm(given_betas=betas, timesteps=1000)
    assert m.num_timesteps == 4
    torch.testing.assert_close(m.alphas_cumprod, f32(np.cumprod([0.9, 0.8, 0.7, 0.6])))


def test_bad_choices_are_rejected() -> None:
    with pytest.raises(ValueError, match="parameterization"):
        ddpm(parameterization="v")
    with pytest.raises(ValueError, match="loss_type"):
        ddpm(loss_type="huber")
