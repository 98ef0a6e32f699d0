"""Diagonal Gaussian posterior of the KL autoencoder, q(z|x) = N(mean, diag(var)).

The encoder predicts `moments` of shape (B, 2C, H, W): the first C channels are the mean, the
last C the log-variance. KL terms are summed over (C, H, W), giving one value per image; the
KL weight of the autoencoder loss (Rombach et al. 2022, Sec. 3 and App. G) multiplies that sum.
Numerics follow CompVis `ldm/modules/distributions/distributions.py`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# CompVis clamps log sigma^2 so exp() neither underflows to zero variance nor overflows.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class DiagonalGaussianDistribution:
    """N(mean, diag(exp(logvar))) built from encoder moments (B, 2C, H, W).

    `deterministic=True` turns it into a point mass at the mean: std = var = 0, `sample()`
    returns the mean and the KL / NLL are zero.
    """

    def __init__(self, parameters: Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # each (B, C, H, W)
        self.logvar = torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """z = mean + std * eps, eps ~ N(0, I); (B, C, H, W).

        Without a generator, eps is drawn on the CPU from the global generator and then moved,
        as CompVis does, so a given `torch.manual_seed` gives CompVis's latents on any device.
        With a generator, eps is drawn on the generator's device.
        """
        if generator is None:
            eps = torch.randn(self.mean.shape)
        else:
            eps = torch.randn(self.mean.shape, generator=generator, device=generator.device)
        eps = eps.to(device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> Tensor:
        """The most likely latent: the mean, (B, C, H, W)."""
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> Tensor:
        """KL(self || other) summed over (C, H, W) -> (B,); `other=None` means N(0, I)."""
        if self.deterministic:
            return self._zero()
        if other is None:
            terms = self.mean.pow(2) + self.var - 1.0 - self.logvar
        else:
            terms = (
                (self.mean - other.mean).pow(2) / other.var
                + self.var / other.var
                - 1.0
                - self.logvar
                + other.logvar
            )
        return 0.5 * torch.sum(terms, dim=[1, 2, 3])

    def nll(self, sample: Tensor, dims: Sequence[int] = (1, 2, 3)) -> Tensor:
        """-log N(sample; mean, var) summed over `dims`."""
        if self.deterministic:
            return self._zero()
        log_two_pi = math.log(2.0 * math.pi)
        terms = log_two_pi + self.logvar + (sample - self.mean).pow(2) / self.var
        return 0.5 * torch.sum(terms, dim=list(dims))

    def _zero(self) -> Tensor:
        # CompVis returns torch.Tensor([0.]); same shape (1,), but on the mean's device/dtype.
        return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)


def normal_kl(
    mean1: Tensor | float, logvar1: Tensor | float, mean2: Tensor | float, logvar2: Tensor | float
) -> Tensor:
    """Elementwise KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)); scalars broadcast.

    Used by the diffusion model's prior term (CompVis `normal_kl`, from OpenAI's
    guided-diffusion); at least one argument must be a tensor.
    """
    ref = next((a for a in (mean1, logvar1, mean2, logvar2) if isinstance(a, Tensor)), None)
    if ref is None:
        raise TypeError("normal_kl needs at least one tensor argument")
    logvar1, logvar2 = (
        a if isinstance(a, Tensor) else torch.tensor(a).to(ref) for a in (logvar1, logvar2)
    )
    return 0.5 * (
        -1.0
        + logvar2
        - logvar1
        + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )
