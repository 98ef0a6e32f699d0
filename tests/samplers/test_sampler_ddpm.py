"""Ancestral DDPM: CompVis p_sample_loop parity, improved-DDPM respacing, Gaussian statistics."""
import numpy as np
import pytest
import torch

from ldm.samplers import ddpm_timesteps, sample_ddpm


def compvis_p_sample_loop(eps_model, x_T, betas, noise, clip_denoised, v_posterior=0.0):
    """DDPM.register_schedule buffers + LatentDiffusion.p_sample_loop / p_sample, eps model."""
    to_torch = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    alphas = 1.0 - betas
    ac = np.cumprod(alphas, axis=0)
    ac_prev = np.append(1.0, ac[:-1])
    sqrt_recip = to_torch(np.sqrt(1.0 / ac))
    sqrt_recipm1 = to_torch(np.sqrt(1.0 / ac - 1))
    post_var = (1 - v_posterior) * betas * (1.0 - ac_prev) / (1.0 - ac) + v_posterior * betas
    post_logvar = to_torch(np.log(np.maximum(post_var, 1e-20)))
    coef1 = to_torch(betas * np.sqrt(ac_prev) / (1.0 - ac))
    coef2 = to_torch((1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac))
    img = x_T
    b = x_T.shape[0]
    for i in reversed(range(len(betas))):
        t = torch.full((b,), i, dtype=torch.long)
        x_recon = sqrt_recip[i] * img - sqrt_recipm1[i] * eps_model(img, t)
        if clip_denoised:
            x_recon = x_recon.clamp(-1.0, 1.0)
        mean = coef1[i] * x_recon + coef2[i] * img
        nonzero = 0.0 if i == 0 else 1.0
        img = mean + nonzero * (0.5 * post_logvar[i]).exp() * noise(img.shape)
    return img


def _eps_model(x, t):
    return torch.tanh(x + t[:, None, None, None].double() / 25)


@pytest.mark.parametrize("clip, v", [(False, 0.0), (True, 0.0), (False, 0.3)])
def test_full_chain_equals_compvis(clip, v, linear_betas):
    T = 40
    betas = linear_betas(T)
    ac = torch.tensor(np.cumprod(1 - betas), dtype=torch.float64)
    x_T = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = sample_ddpm(_eps_model, x_T, ac, T, generator=torch.Generator().manual_seed(1),
                       clip_denoised=clip, v_posterior=v)
    g = torch.Generator().manual_seed(1)
    ref = compvis_p_sample_loop(
        _eps_model, x_T, betas, lambda s: torch.randn(s, generator=g, dtype=torch.float64),
        clip, v,
    )
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_respaced_timesteps():
    assert torch.equal(ddpm_timesteps(1000, 1000), torch.arange(1000))
    assert ddpm_timesteps(1000, 4).tolist() == [0, 333, 666, 999]
    assert ddpm_timesteps(10, 4).tolist() == [0, 3, 6, 9]
    assert ddpm_timesteps(1000, 1).tolist() == [999]
    with pytest.raises(ValueError, match="steps"):
        ddpm_timesteps(1000, 1001)


def test_respaced_chain_uses_respaced_betas():
    # Two kept timesteps {0, 9} of T = 10: beta_1 = 1 - abar_9 / abar_0 and the model sees t = 9.
    abar = torch.linspace(0.99, 0.2, 10, dtype=torch.float64)
    seen = []
    x_T = torch.full((1, 1, 1, 1), 0.7, dtype=torch.float64)
    eps_value = 0.3

    def eps_fn(x, t):
        seen.append(t.tolist())
        return torch.full_like(x, eps_value)

    z = torch.randn(1, 1, 1, 1, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out = sample_ddpm(eps_fn, x_T, abar, 2, generator=torch.Generator().manual_seed(2))
    assert seen == [[9], [0]]
    a1, a0 = abar[9], abar[0]
    beta = 1 - a1 / a0
    x0 = (x_T - (1 - a1).sqrt() * eps_value) / a1.sqrt()
    x1 = (beta * a0.sqrt() * x0 + (1 - a0) * (1 - beta).sqrt() * x_T) / (1 - a1)
    x1 = x1 + (beta * (1 - a0) / (1 - a1)).sqrt() * z
    expected = (x1 - (1 - a0).sqrt() * eps_value) / a0.sqrt()  # last step: x = pred_x0
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_generator_only_and_reproducible():
    abar = torch.linspace(0.99, 0.01, 50, dtype=torch.float64)
    x_T = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    state = torch.get_rng_state()
    a = sample_ddpm(_eps_model, x_T, abar, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), state)
    b = sample_ddpm(_eps_model, x_T, abar, 10, generator=torch.Generator().manual_seed(3))
    c = sample_ddpm(_eps_model, x_T, abar, 10, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_callback_once_per_step():
    abar = torch.linspace(0.99, 0.01, 50, dtype=torch.float64)
    seen = []
    sample_ddpm(_eps_model, torch.zeros(1, 1, 2, 2, dtype=torch.float64), abar, 7,
                callback=lambda i, n, x, x0: seen.append((i, n)))
    assert seen == [(i, 7) for i in range(7)]


def test_gaussian_data_statistics(abar, gaussian_data):
    # Data N(mu, s^2) per channel, sampled with its exact eps: ancestral sampling should then
    # reproduce mean and std.
    T = 1000
    mu, s = gaussian_data.mu, gaussian_data.s
    eps_fn = gaussian_data.eps_fn(abar)
    n = 2000
    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(n, 4, 1, 1, generator=g, dtype=torch.float64)
    out = sample_ddpm(eps_fn, x_T, abar, T, generator=g)
    mean, std = out.mean(0).flatten(), out.std(0).flatten()
    # 5 standard errors on the mean; a few percent on the std (sampling error ~1.6%).
    assert (mean - mu.flatten()).abs().le(5 * s.flatten() / n**0.5).all(), mean
    torch.testing.assert_close(std, s.flatten(), rtol=0.06, atol=0)

    # Respaced to 100 steps the mean still matches; the "fixed small" variance loses a little
    # spread on coarse steps (Nichol & Dhariwal 2021), hence the looser std bound.
    out = sample_ddpm(eps_fn, x_T, abar, 100, generator=g)
    mean, std = out.mean(0).flatten(), out.std(0).flatten()
    assert (mean - mu.flatten()).abs().le(5 * s.flatten() / n**0.5).all(), mean
    assert ((std / s.flatten() > 0.85) & (std / s.flatten() < 1.05)).all(), std
