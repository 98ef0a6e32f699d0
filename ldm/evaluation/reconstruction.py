"""How well an autoencoder reconstructs images: PSNR and SSIM (scikit-image), the perceptual
distance it was trained with (LPIPS on EfficientNet-Lite0, `ldm/modules/losses/perceptual.py`)
and the colour error (how far each image's mean colour moves: a washed-out palette, yellow
turning brown, shows here even when PSNR looks fine)."""
from __future__ import annotations

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm.pipeline import latents_to_uint8

BATCH = 64


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


@torch.no_grad()
def reconstruct(model, images: np.ndarray) -> np.ndarray:
    """uint8 reconstructions through the posterior's mode (as the LDM encodes)."""
    out = []
    for start in range(0, len(images), BATCH):
        x = to_model_range(images[start:start + BATCH])
        out.append(latents_to_uint8(model.decode(model.encode(x).mode())))
    return np.concatenate(out)


@torch.no_grad()
def reconstruction_metrics(model, images: np.ndarray) -> dict:
    """Means over `images` (uint8 (N, H, W, 3)) of PSNR (dB), SSIM, the perceptual distance
    and the mean-colour error (0-255 per channel)."""
    from ldm.modules.losses.perceptual import EfficientNetLPIPS

    rec = reconstruct(model, images)
    psnrs = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(images, rec,
                                                                           strict=True)]
    ssims = [structural_similarity(a, b, channel_axis=2, data_range=255)
             for a, b in zip(images, rec, strict=True)]
    lpips = EfficientNetLPIPS()
    perceptual = torch.cat([lpips(to_model_range(images[s:s + BATCH]),
                                  to_model_range(rec[s:s + BATCH])).flatten()
                            for s in range(0, len(images), BATCH)])
    colour = np.abs(images.reshape(len(images), -1, 3).mean(1)
                    - rec.reshape(len(rec), -1, 3).mean(1)).mean()
    return {"images": len(images), "psnr_db": float(np.mean(psnrs)),
            "ssim": float(np.mean(ssims)), "perceptual": float(perceptual.mean()),
            "colour_error": float(colour)}
