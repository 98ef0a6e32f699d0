"""Stand-ins the sampler tests share, as fixtures.

Symbols: beta_t the noise variance of step t, alpha_bar_t = prod_{s<=t} (1 - beta_s)
(`alphas_cumprod`), eps_theta(x_t, t, c) the UNet's noise prediction.

- `linear_betas(T)`: beta_t of the CompVis LDM "linear" schedule (sqrt(beta_t) linear from
  sqrt(0.00085) to sqrt(0.012)), float64, as CompVis `make_beta_schedule` computes it.
- `abar`: its alpha_bar_t for T = 1000 in float64; `model_alphas_cumprod`: the same as the
  model's float32 buffer (what the served samplers get).
- `make_unet(seed)`: a random nonlinear eps_theta that records its calls.
- `gaussian_data`: data x_0 ~ N(mu, s^2) per channel, whose exact eps and probability-flow
  map are closed forms.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import Tensor


def _linear_betas(T: int) -> np.ndarray:
    # torch.linspace in float64, as CompVis: numpy's linspace differs in the last bit.
    return (torch.linspace(0.00085**0.5, 0.012**0.5, T, dtype=torch.float64) ** 2).numpy()


@pytest.fixture
def linear_betas() -> Callable[[int], np.ndarray]:
    """T -> beta_1..beta_T of the LDM "linear" schedule, float64 numpy."""
    return _linear_betas


@pytest.fixture
def abar() -> Tensor:
    """alpha_bar_t of the LDM "linear" schedule, T = 1000, float64."""
    return torch.cumprod(1 - torch.from_numpy(_linear_betas(1000)), 0)


@pytest.fixture
def model_alphas_cumprod(abar: Tensor) -> Tensor:
    """alpha_bar_t as the model registers it: computed in float64, stored as float32."""
    return abar.float()


class StandInUNet:
    """A random nonlinear stand-in for eps_theta(x, t, c): conv + timestep features + pooled
    context. Records the batch size and first timestep of every call."""

    def __init__(self, seed: int, channels: int = 3, context_dim: int = 5):
        g = torch.Generator().manual_seed(seed)
        self.w = 0.3 * torch.randn(channels, channels, 3, 3, generator=g)
        self.wt = 0.3 * torch.randn(8, channels, generator=g)
        self.wc = 0.3 * torch.randn(context_dim, channels, generator=g)
        self.freqs = torch.rand(8, generator=g) / 100
        self.batches: list[int] = []
        self.timesteps: list[int] = []

    def __call__(self, x: Tensor, t: Tensor, context: Tensor) -> Tensor:
        self.batches.append(x.shape[0])
        self.timesteps.append(int(t[0]))
        h = torch.tanh(torch.nn.functional.conv2d(x, self.w, padding=1))
        temb = torch.sin(t[:, None].float() * self.freqs) @ self.wt
        cemb = context.mean(1) @ self.wc
        return h + (temb + cemb)[:, :, None, None]


@pytest.fixture
def make_unet() -> Callable[..., StandInUNet]:
    """seed (, channels, context_dim) -> a fresh StandInUNet; equal seeds, equal weights."""
    return StandInUNet


def _per_channel(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64).view(1, len(values), 1, 1)


@dataclass(frozen=True)
class GaussianData:
    """Data x_0 ~ N(mu, s^2) per channel (4 channels), float64.

    With x_t = alpha x_0 + sigma eps (alpha^2 = alpha_bar_t, sigma^2 = 1 - alpha_bar_t),
    x_t ~ N(alpha mu, alpha^2 s^2 + sigma^2) and the exact (optimal) eps is
        E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2).
    The probability-flow ODE keeps the standardised value fixed, so it maps x at alpha_bar_a
    to x_b = alpha_b mu + sqrt((ab_b s^2 + 1 - ab_b) / (ab_a s^2 + 1 - ab_a)) (x_a - alpha_a mu).
    """

    mu: Tensor = field(default_factory=lambda: _per_channel([0.5, -1.0, 0.2, 1.5]))
    s: Tensor = field(default_factory=lambda: _per_channel([0.3, 0.8, 1.2, 0.5]))

    def eps_fn(self, abar: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
        """(x_t, t) -> E[eps | x_t] under the schedule alpha_bar = abar."""
        mu, s = self.mu, self.s

        def eps(x: Tensor, t: Tensor) -> Tensor:
            a = abar[t].view(-1, 1, 1, 1)
            return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)

        return eps

    def flow(self, x: Tensor, abar_from: Tensor, abar_to: Tensor) -> Tensor:
        """The exact probability-flow map of x from alpha_bar = abar_from to abar_to."""
        mu, s = self.mu, self.s
        scale = ((abar_to * s**2 + 1 - abar_to) / (abar_from * s**2 + 1 - abar_from)).sqrt()
        return abar_to.sqrt() * mu + scale * (x - abar_from.sqrt() * mu)


@pytest.fixture
def gaussian_data() -> GaussianData:
    return GaussianData()
