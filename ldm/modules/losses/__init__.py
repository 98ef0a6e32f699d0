"""Autoencoder training losses: LPIPS perceptual distance, PatchGAN discriminator, and their
combination `LPIPSWithDiscriminator` (CompVis `ldm.modules.losses`)."""
from ldm.modules.losses.discriminator import (
    NLayerDiscriminator,
    adopt_weight,
    hinge_d_loss,
    vanilla_d_loss,
    weights_init,
)
from ldm.modules.losses.efficientnet import EfficientNetLite0, load_efficientnet_lite0
from ldm.modules.losses.lpips_disc import LPIPSWithDiscriminator
from ldm.modules.losses.perceptual import LPIPS, EfficientNetLPIPS, build_perceptual_loss

__all__ = [
    "LPIPS",
    "EfficientNetLPIPS",
    "EfficientNetLite0",
    "LPIPSWithDiscriminator",
    "NLayerDiscriminator",
    "adopt_weight",
    "build_perceptual_loss",
    "hinge_d_loss",
    "load_efficientnet_lite0",
    "vanilla_d_loss",
    "weights_init",
]
