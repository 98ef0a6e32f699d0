"""PatchGAN discriminator (Isola et al. 2017, pix2pix) and the GAN losses of taming-transformers
(Esser et al. 2021), as CompVis's autoencoder loss uses them.

Module tree and state-dict keys are taming's `NLayerDiscriminator`: one `main` Sequential whose
indices count every layer (conv, norm, LeakyReLU), e.g. for n_layers=3:
`main.0` conv, `main.2` conv, `main.3` BatchNorm, `main.5`, `main.6`, `main.8`, `main.9`, `main.11`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

KERNEL = 4
PADDING = 1


class ActNorm(nn.Module):
    """Per-channel affine h = scale * (x + loc), initialised from the first training batch to
    zero mean / unit std (Kingma & Dhariwal 2018, Glow). taming's keys: loc, scale, initialized."""

    def __init__(self, num_features: int):
        super().__init__()
        self.loc = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.scale = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.register_buffer("initialized", torch.tensor(0, dtype=torch.uint8))

    @torch.no_grad()
    def _initialize(self, x: torch.Tensor) -> None:
        flat = x.transpose(0, 1).reshape(x.shape[1], -1)
        self.loc.copy_(-flat.mean(dim=1)[None, :, None, None])
        self.scale.copy_(1 / (flat.std(dim=1)[None, :, None, None] + 1e-6))
        self.initialized.fill_(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.initialized.item() == 0:
            self._initialize(x)
        return self.scale * (x + self.loc)


class NLayerDiscriminator(nn.Module):
    """PatchGAN: (B, input_nc, H, W) -> (B, 1, H', W') real/fake logits, one per ~70x70 patch
    for n_layers=3 (H' = H/8 - 2 for H divisible by 8).

    Strided 4x4 convs double the width up to 8 * ndf; norm layers follow every conv but the
    first and the last. With BatchNorm the convs before it carry no bias (taming's rule).
    """

    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3,
                 use_actnorm: bool = False):
        super().__init__()
        norm_layer = ActNorm if use_actnorm else nn.BatchNorm2d
        use_bias = use_actnorm  # BatchNorm's own shift makes a conv bias redundant

        layers: list[nn.Module] = [
            nn.Conv2d(input_nc, ndf, KERNEL, stride=2, padding=PADDING),
            nn.LeakyReLU(0.2, True),
        ]

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            conv = nn.Conv2d(c_in, c_out, KERNEL, stride=stride, padding=PADDING, bias=use_bias)
            return [conv, norm_layer(c_out), nn.LeakyReLU(0.2, True)]

        mult = 1
        for n in range(1, n_layers):
            prev, mult = mult, min(2**n, 8)
            layers += block(ndf * prev, ndf * mult, stride=2)
        # The last hidden block keeps the resolution.
        prev, mult = mult, min(2**n_layers, 8)
        layers += block(ndf * prev, ndf * mult, stride=1)
        layers.append(nn.Conv2d(ndf * mult, 1, KERNEL, stride=1, padding=PADDING))
        self.main = nn.Sequential(*layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return self.main(input)


def weights_init(m: nn.Module) -> None:
    """taming's init, for `.apply()`: conv weights ~ N(0, 0.02) (biases keep PyTorch's default),
    BatchNorm weight ~ N(1, 0.02) and bias 0. Matched on the class name, as taming does."""
    name = type(m).__name__
    if "Conv" in name:
        nn.init.normal_(m.weight.data, 0.0, 0.02)
    elif "BatchNorm" in name:
        nn.init.normal_(m.weight.data, 1.0, 0.02)
        nn.init.constant_(m.bias.data, 0)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """0.5 * (E[relu(1 - D(x))] + E[relu(1 + D(G(z)))])."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def vanilla_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating GAN: 0.5 * (E[-log sigmoid(D(x))] + E[-log(1 - sigmoid(D(G(z))))])."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def adopt_weight(weight: float, global_step: int, threshold: int = 0, value: float = 0.0) -> float:
    """`value` before step `threshold` (the discriminator warm-up), `weight` from then on."""
    return value if global_step < threshold else weight
