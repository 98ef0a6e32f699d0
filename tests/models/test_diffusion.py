"""DDPM's forward process q, reverse process p, training loss and EMA against closed forms
(Ho et al. 2020).

Every expected value here is computed independently in the test (numpy float64 closed forms,
or the UNet called directly), never read back from the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.models.diffusion_helpers import closed_form_schedule, ddpm, f32, randomize_

# --- forward process --------------------------------------------------------------------


def test_q_sample_mean_and_variance() -> None:
    m = ddpm()
    ab = closed_form_schedule()["ab"]
    n, x0_value = 200_000, 0.7
    g = torch.Generator().manual_seed(0)
    for step in (0, 250, 999):
        x0 = torch.full((n, 1, 1, 1), x0_value)
        t = torch.full((n,), step, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g)
        xt = m.q_sample(x0, t, noise)
        mean, var = math.sqrt(ab[step]) * x0_value, 1 - ab[step]
        # Exact for a given eps, and the right moments over eps ~ N(0, I).
        torch.testing.assert_close(
            xt, mean + math.sqrt(var) * noise, rtol=1e-5, atol=1e-6
        )
        assert abs(xt.mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(xt.var().item() / var - 1) < 5 * math.sqrt(2 / n)
        q_mean, q_var, q_logvar = m.q_mean_variance(x0[:2], t[:2])
        torch.testing.assert_close(q_mean, torch.full((2, 1, 1, 1), mean))
        torch.testing.assert_close(q_var, torch.full((2, 1, 1, 1), var))
        torch.testing.assert_close(q_logvar, torch.full((2, 1, 1, 1), math.log(var)))


def test_predict_start_from_noise_inverts_q_sample() -> None:
    m = ddpm()
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 900])
    xt = m.q_sample(x0, t, eps)
    torch.testing.assert_close(m.predict_start_from_noise(xt, t, eps), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.predict_eps_from_start(xt, t, x0), eps, rtol=1e-3, atol=1e-3)


# --- losses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameterization, loss_type, learn_logvar",
    [("eps", "l2", False), ("x0", "l1", False), ("eps", "l1", True), ("x0", "l2", True)],
)
def test_p_losses_equals_independent_computation(
    parameterization: str, loss_type: str, learn_logvar: bool
) -> None:
    m = ddpm(
        parameterization=parameterization,
        loss_type=loss_type,
        learn_logvar=learn_logvar,
        logvar_init=0.25,
        l_simple_weight=0.7,
        original_elbo_weight=0.3,
    )
    randomize_(m.model)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 16, 16, generator=g)
    noise = torch.randn(3, 4, 16, 16, generator=g)
    context = torch.randn(3, 5, 32, generator=g)
    t = torch.tensor([0, 420, 999])

    s = closed_form_schedule()
    ab = f32(s["ab"])[t][:, None, None, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        out = m.model.diffusion_model(xt, t, context=context)
        loss, logs = m.p_losses(x0, t, context, noise=noise)
    target = noise if parameterization == "eps" else x0
    err = (out - target).abs() if loss_type == "l1" else (out - target) ** 2
    per_sample = err.mean(dim=(1, 2, 3))
    # CompVis applies logvar_t = logvar_init whether or not it is learned.
    gamma = per_sample / math.exp(0.25) + 0.25
    if parameterization == "eps":
        beta_tilde = (1 - s["ab_prev"]) / (1 - s["ab"]) * s["betas"]
        with np.errstate(divide="ignore"):
            w = s["betas"] ** 2 / (2 * beta_tilde * s["alphas"] * (1 - s["ab"]))
    else:
        w = 0.5 * np.sqrt(s["ab"]) / (2.0 - s["ab"])
    w[0] = w[1]
    vlb = (f32(w)[t] * per_sample).mean()
    expected = 0.7 * gamma.mean() + 0.3 * vlb

    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs["train/loss_simple"], per_sample.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs["train/loss_vlb"], vlb, rtol=1e-4, atol=1e-6)
    assert logs["train/loss"] is loss
    keys = {"train/loss_simple", "train/loss_vlb", "train/loss"}
    if learn_logvar:
        keys |= {"train/loss_gamma", "logvar"}
        torch.testing.assert_close(logs["train/loss_gamma"], gamma.mean(), rtol=1e-4, atol=1e-6)
    assert set(logs) == keys


def test_loss_dict_prefix_follows_training_mode() -> None:
    m = ddpm()
    x0, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 32), torch.tensor([1, 2])
    m.eval()
    with torch.no_grad():
        _, logs = m.p_losses(x0, t, ctx)
    assert set(logs) == {"val/loss_simple", "val/loss_vlb", "val/loss"}


def test_get_loss_reductions() -> None:
    pred, target = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.0, 0.0, 1.0])
    l1, l2 = ddpm(loss_type="l1"), ddpm(loss_type="l2")
    assert torch.equal(l1.get_loss(pred, target, mean=False), torch.tensor([1.0, 2.0, 2.0]))
    assert l1.get_loss(pred, target).item() == pytest.approx(5 / 3)
    assert torch.equal(l2.get_loss(pred, target, mean=False), torch.tensor([1.0, 4.0, 4.0]))
    assert l2.get_loss(pred, target).item() == pytest.approx(3.0)


def test_p_mean_variance_and_p_sample_at_t0() -> None:
    m = ddpm(clip_denoised=False)
    randomize_(m.model)
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 32), torch.tensor([0, 0])
    with torch.no_grad():
        eps = m.model.diffusion_model(x, t, context=ctx)
        mean, _, _, x0_hat = m.p_mean_variance(x, t, ctx, return_x0=True)
        sample = m.p_sample(x, t, ctx, generator=torch.Generator().manual_seed(0))
    ab0 = closed_form_schedule()["ab"][0]
    torch.testing.assert_close(x0_hat, (x - math.sqrt(1 - ab0) * eps) / math.sqrt(ab0))
    # At t = 0, alpha_bar_prev = 1: the posterior mean is x_0_hat itself and no noise is added.
    torch.testing.assert_close(mean, x0_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample, mean)


# --- EMA ---------------------------------------------------------------------------------


def test_ema_scope_swaps_weights_and_restores_them() -> None:
    m = ddpm()
    original = {k: v.clone() for k, v in m.model.named_parameters()}
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in m.model.named_parameters()}
    with m.ema_scope("test"):
        for k, v in m.model.named_parameters():
            assert torch.equal(v, original[k]), k
    for k, v in m.model.named_parameters():
        assert torch.equal(v, trained[k]), k
    # One EMA step with num_updates=1: decay = min(0.9999, 2/11) -> shadow moves 9/11 of the way.
    m.update_ema()
    name = "diffusion_model.out.2.weight"
    shadow = dict(m.model_ema.named_buffers())[name.replace(".", "")]
    torch.testing.assert_close(shadow, original[name] + 9 / 11, rtol=1e-6, atol=1e-6)


def test_ema_scope_is_a_no_op_without_ema() -> None:
    m = ddpm(use_ema=False)
    assert m.model_ema is None
    assert not any(k.startswith("model_ema") for k in m.state_dict())
    before = [p.clone() for p in m.model.parameters()]
    with m.ema_scope():
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, m.model.parameters(), strict=True))
