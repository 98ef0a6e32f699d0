"""DiagonalGaussianDistribution against torch.distributions on random moments."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from ldm.modules.distributions import DiagonalGaussianDistribution, normal_kl


def _moments(b=2, c=3, h=4, w=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2 * c, h, w, generator=g, dtype=torch.float64)


def test_mean_logvar_split_on_channel_axis():
    params = _moments()
    d = DiagonalGaussianDistribution(params)
    torch.testing.assert_close(d.mean, params[:, :3])
    torch.testing.assert_close(d.logvar, params[:, 3:])
    torch.testing.assert_close(d.std, params[:, 3:].mul(0.5).exp())
    torch.testing.assert_close(d.var, params[:, 3:].exp())
    assert d.mode() is d.mean


def test_logvar_is_clamped_to_minus30_plus20():
    params = torch.zeros(1, 2, 1, 3, dtype=torch.float64)
    params[0, 1, 0] = torch.tensor([-100.0, 5.0, 100.0])
    d = DiagonalGaussianDistribution(params)
    assert d.logvar.flatten().tolist() == [-30.0, 5.0, 20.0]
    assert d.var.flatten().tolist() == pytest.approx([math.exp(-30), math.exp(5), math.exp(20)])


def test_kl_to_standard_normal_matches_torch():
    d = DiagonalGaussianDistribution(_moments())
    ref = kl_divergence(Normal(d.mean, d.std), Normal(0.0, 1.0)).sum(dim=(1, 2, 3))
    assert d.kl().shape == (2,)
    torch.testing.assert_close(d.kl(), ref)


def test_kl_between_two_gaussians_matches_torch():
    p = DiagonalGaussianDistribution(_moments(seed=1))
    q = DiagonalGaussianDistribution(_moments(seed=2))
    ref = kl_divergence(Normal(p.mean, p.std), Normal(q.mean, q.std)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(p.kl(q), ref)
    torch.testing.assert_close(p.kl(p), torch.zeros(2, dtype=torch.float64))


def test_nll_matches_torch_log_prob():
    d = DiagonalGaussianDistribution(_moments())
    x = torch.randn_like(d.mean)
    normal = Normal(d.mean, d.std)
    torch.testing.assert_close(d.nll(x), -normal.log_prob(x).sum(dim=(1, 2, 3)))
    torch.testing.assert_close(d.nll(x, dims=(1,)), -normal.log_prob(x).sum(dim=1))


def test_sample_uses_cpu_global_rng_like_compvis():
    d = DiagonalGaussianDistribution(_moments().float())
    torch.manual_seed(123)
    z = d.sample()
    torch.manual_seed(123)
    eps = torch.randn(d.mean.shape)
    torch.testing.assert_close(z, d.mean + d.std * eps)


def test_sample_with_generator_is_reproducible_and_has_right_moments():
    mean = torch.full((1, 1, 200, 200), 2.0)
    logvar = torch.full((1, 1, 200, 200), math.log(0.25))
    d = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    z1 = d.sample(torch.Generator().manual_seed(7))
    z2 = d.sample(torch.Generator().manual_seed(7))
    assert torch.equal(z1, z2)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z1, 2.0 + 0.5 * eps)
    assert abs(z1.mean().item() - 2.0) < 0.01  # 40k draws: std error 0.0025
    assert abs(z1.std().item() - 0.5) < 0.01


def test_deterministic_is_a_point_mass():
    params = _moments()
    d = DiagonalGaussianDistribution(params, deterministic=True)
    assert torch.count_nonzero(d.std) == 0 and torch.count_nonzero(d.var) == 0
    torch.testing.assert_close(d.sample(), d.mean)
    assert d.kl().tolist() == [0.0]
    assert d.nll(torch.randn_like(d.mean)).tolist() == [0.0]


def test_normal_kl_matches_torch_and_accepts_scalars():
    g = torch.Generator().manual_seed(3)
    m1, lv1, m2, lv2 = torch.randn(4, 10, generator=g, dtype=torch.float64)
    ref = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref)
    ref0 = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(0.0, 1.0))
    torch.testing.assert_close(normal_kl(m1, lv1, 0.0, 0.0), ref0)
    with pytest.raises(TypeError):
        normal_kl(0.0, 0.0, 0.0, 0.0)
