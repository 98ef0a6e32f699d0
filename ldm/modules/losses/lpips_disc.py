"""Training loss of the KL autoencoder (Rombach et al. 2022, appendix G; CompVis
`ldm/modules/losses/contperceptual.py`): L1 + LPIPS reconstruction under a learned Laplace-like
scale, a KL term on the posterior, and a PatchGAN adversarial term with an adaptive weight.

Symbols:
    rec_loss  = |x - x_rec| + perceptual_weight * LPIPS(x, x_rec)           per pixel, (B, C, H, W)
    nll_loss  = rec_loss / exp(logvar) + logvar                             `logvar` is learned
    kl_loss   = sum_b KL(q(z|x_b) || N(0, I)) / B
    g_loss    = -E[D(x_rec)]
    d_weight  = disc_weight * ||grad_L nll|| / (||grad_L g_loss|| + 1e-4)   L = decoder's last layer
                (Esser et al. 2021, eq. 7), clamped to [0, 1e4] and detached
    generator     (optimizer_idx 0): weighted nll + kl_weight * kl + d_weight * disc_factor * g_loss
    discriminator (optimizer_idx 1): disc_factor * hinge_d_loss(D(x), D(x_rec))
with disc_factor = 0 before `disc_start` steps.

State-dict keys are CompVis's: `logvar`, `perceptual_loss.*`, `discriminator.main.*`. The frozen
perceptual network stays in the state dict as in CompVis, so autoencoder checkpoints trained with
the VGG16 LPIPS load with `strict=True`; with the EfficientNet backbone its keys are ours.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn

from ldm.config import LossConfig
from ldm.modules.losses.discriminator import (
    NLayerDiscriminator,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
    weights_init,
)
from ldm.modules.losses.perceptual import build_perceptual_loss

D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


class Posterior(Protocol):
    """What the loss needs of `DiagonalGaussianDistribution`."""

    def kl(self) -> torch.Tensor:  # (B,)
        ...


class LPIPSWithDiscriminator(nn.Module):
    """CompVis's `LPIPSWithDiscriminator` (same attributes, keys, log names and numerics)."""

    def __init__(self, cfg: LossConfig):
        super().__init__()
        if cfg.disc_loss not in D_LOSSES:
            raise ValueError(f"disc_loss: {cfg.disc_loss!r} is not one of {list(D_LOSSES)}")
        self.cfg = cfg
        self.kl_weight = cfg.kl_weight
        # Kept for CompVis parity: CompVis stores but never applies pixelloss_weight.
        self.pixel_weight = cfg.pixelloss_weight
        self.perceptual_loss = build_perceptual_loss(cfg)
        self.perceptual_weight = cfg.perceptual_weight
        self.logvar = nn.Parameter(torch.ones(size=()) * cfg.logvar_init)
        self.discriminator = NLayerDiscriminator(
            input_nc=cfg.disc_in_channels, n_layers=cfg.disc_num_layers,
            use_actnorm=cfg.use_actnorm,
        ).apply(weights_init)
        self.discriminator_iter_start = cfg.disc_start
        self.disc_loss = D_LOSSES[cfg.disc_loss]
        self.disc_factor = cfg.disc_factor
        self.discriminator_weight = cfg.disc_weight
        self.disc_conditional = cfg.disc_conditional

    def calculate_adaptive_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor
    ) -> torch.Tensor:
        """Scale the GAN gradient at `last_layer` to the reconstruction gradient's norm."""
        nll_grads = torch.autograd.grad(nll_loss, last_layer, retain_graph=True)[0]
        g_grads = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
        d_weight = torch.norm(nll_grads) / (torch.norm(g_grads) + 1e-4)
        d_weight = torch.clamp(d_weight, 0.0, 1e4).detach()
        return d_weight * self.discriminator_weight

    def _discriminate(self, x: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        if (cond is not None) != self.disc_conditional:
            raise ValueError(f"cond must be given iff disc_conditional ({self.disc_conditional})")
        if cond is not None:
            x = torch.cat((x, cond), dim=1)
        return self.discriminator(x)

    def _generator_d_weight(
        self, nll_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor | None
    ) -> torch.Tensor:
        zero = torch.tensor(0.0, device=nll_loss.device)
        if self.disc_factor <= 0.0:
            return zero
        # CompVis catches the RuntimeError autograd raises without a graph (validation under
        # no_grad) and uses 0, but only outside training.
        try:
            if last_layer is None:
                raise RuntimeError("last_layer is needed for the adaptive GAN weight")
            return self.calculate_adaptive_weight(nll_loss, g_loss, last_layer)
        except RuntimeError:
            if self.training:
                raise
            return zero

    def forward(
        self,
        inputs: torch.Tensor,
        reconstructions: torch.Tensor,
        posteriors: Posterior,
        optimizer_idx: int,
        global_step: int,
        last_layer: torch.Tensor | None = None,
        cond: torch.Tensor | None = None,
        split: str = "train",
        weights: torch.Tensor | float | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """inputs, reconstructions: (B, C, H, W) in [-1, 1]; posteriors.kl(): (B,);
        optimizer_idx 0 = autoencoder step, 1 = discriminator step. Returns (loss, log)."""
        inputs, reconstructions = inputs.contiguous(), reconstructions.contiguous()
        disc_factor = adopt_weight(self.disc_factor, global_step,
                                   threshold=self.discriminator_iter_start)

        if optimizer_idx == 1:
            logits_real = self._discriminate(inputs.detach(), cond)
            logits_fake = self._discriminate(reconstructions.detach(), cond)
            d_loss = disc_factor * self.disc_loss(logits_real, logits_fake)
            log = {
                f"{split}/disc_loss": d_loss.clone().detach().mean(),
                f"{split}/logits_real": logits_real.detach().mean(),
                f"{split}/logits_fake": logits_fake.detach().mean(),
            }
            return d_loss, log
        if optimizer_idx != 0:
            raise ValueError(f"optimizer_idx must be 0 or 1, got {optimizer_idx}")

        rec_loss = torch.abs(inputs - reconstructions)
        if self.perceptual_weight > 0:
            p_loss = self.perceptual_loss(inputs, reconstructions)  # (B, 1, 1, 1)
            rec_loss = rec_loss + self.perceptual_weight * p_loss
        nll_loss = rec_loss / torch.exp(self.logvar) + self.logvar
        weighted_nll_loss = nll_loss if weights is None else weights * nll_loss
        # Sums over pixels, means over the batch.
        weighted_nll_loss = torch.sum(weighted_nll_loss) / weighted_nll_loss.shape[0]
        nll_loss = torch.sum(nll_loss) / nll_loss.shape[0]
        kl_loss = posteriors.kl()
        kl_loss = torch.sum(kl_loss) / kl_loss.shape[0]

        g_loss = -torch.mean(self._discriminate(reconstructions, cond))
        d_weight = self._generator_d_weight(nll_loss, g_loss, last_layer)
        loss = weighted_nll_loss + self.kl_weight * kl_loss + d_weight * disc_factor * g_loss
        log = {
            f"{split}/total_loss": loss.clone().detach().mean(),
            f"{split}/logvar": self.logvar.detach(),
            f"{split}/kl_loss": kl_loss.detach().mean(),
            f"{split}/nll_loss": nll_loss.detach().mean(),
            f"{split}/rec_loss": rec_loss.detach().mean(),
            f"{split}/d_weight": d_weight.detach(),
            f"{split}/disc_factor": torch.tensor(disc_factor),
            f"{split}/g_loss": g_loss.detach().mean(),
        }
        return loss, log
