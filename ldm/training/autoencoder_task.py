"""Stage 1: the KL autoencoder with LPIPS + patch-discriminator loss (two optimizers)."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ldm.config import AutoencoderConfig
from ldm.models.autoencoder import AutoencoderKL
from ldm.pipeline import latents_to_uint8
from ldm.pretrained import save_pretrained
from ldm.training import randomness


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((x.clamp(-1, 1) - y.clamp(-1, 1)) ** 2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def image_grid(rows: list[np.ndarray]) -> np.ndarray:
    """rows of (B, H, W, 3) -> one (rows*H, B*W, 3) image."""
    return np.concatenate([np.concatenate(list(r), axis=1) for r in rows], axis=0)


class AutoencoderTask:
    # What the progress bar and log lines show. `total_loss` is CompVis's: a sum over the
    # pixels of an image (~6e4 at 64x64), so the bar shows it per pixel instead.
    progress_keys = ("train/loss_per_px", "train/rec_loss", "train/disc_loss")

    def __init__(self, cfg: AutoencoderConfig, val_images: torch.Tensor,
                 freeze_encoder: bool = False):
        if cfg.lossconfig is None:
            raise ValueError("autoencoder training needs model.lossconfig")
        self.cfg = cfg
        self.model = AutoencoderKL(cfg)
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            self.model.encoder.requires_grad_(False)
            self.model.quant_conv.requires_grad_(False)
        self.val_images = val_images[:8]
        self._cache: tuple | None = None  # (reconstructions, step) from the generator pass

    def param_groups(self):
        m = self.model
        # As CompVis: the generator optimizer holds encoder, decoder and the quant convs.
        ae = [*m.decoder.parameters(), *m.post_quant_conv.parameters()]
        if not self.freeze_encoder:
            ae = [*m.encoder.parameters(), *m.quant_conv.parameters(), *ae]
        return [ae, list(m.loss.discriminator.parameters())]

    def active_optimizers(self, step: int) -> list[int]:
        # Before disc_start the discriminator loss is multiplied by 0 (CompVis): skip its pass.
        return [0, 1] if step >= self.cfg.lossconfig.disc_start else [0]

    def loss(self, batch, gens, step, opt_idx):
        x = batch["image"]
        if opt_idx == 0:
            with torch.set_grad_enabled(not self.freeze_encoder):
                posterior = self.model.encode(x)
            z = posterior.mean + posterior.std * randomness.randn(gens, posterior.mean.shape[1:])
            rec = self.model.decode(z)
            self._cache = (rec.detach(), posterior)
            loss, logs = self.model.loss(x, rec, posterior, 0, step,
                                         last_layer=self.model.get_last_layer(), split="train")
            logs["train/loss_per_px"] = logs["train/total_loss"] / x[0].numel()
        else:
            rec, posterior = self._cache
            loss, logs = self.model.loss(x, rec, posterior, 1, step,
                                         last_layer=self.model.get_last_layer(), split="train")
        return loss, {k: float(v.detach()) for k, v in logs.items()}

    def after_step(self, step: int) -> None:
        self._cache = None

    def validate(self, batches: Iterator[dict]) -> dict[str, float]:
        scores, l1 = [], []
        for batch in batches:
            x = batch["image"]
            rec = self.model.decode(self.model.encode(x).mode())
            scores.append(psnr(rec, x))
            l1.append((rec - x).abs().flatten(1).mean(1))
        return {"val/psnr": float(torch.cat(scores).mean()),
                "val/rec_loss": float(torch.cat(l1).mean())}

    def sample_grid(self, step: int) -> np.ndarray:
        x = self.val_images
        rec = self.model.decode(self.model.encode(x).mode())
        return image_grid([latents_to_uint8(x), latents_to_uint8(rec)])

    def save_model(self, folder: Path) -> None:
        save_pretrained(folder, self.model, "autoencoder", self.cfg)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
