"""Stage 2: latent diffusion on a frozen autoencoder, with caption dropout for CFG and EMA."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ldm.config import LDMConfig
from ldm.models.diffusion import LatentDiffusion
from ldm.pipeline import Txt2ImgPipeline
from ldm.pretrained import save_pretrained
from ldm.training import randomness
from ldm.training.autoencoder_task import image_grid


class LDMTask:
    progress_keys = ("train/loss",)

    def __init__(self, cfg: LDMConfig, ema_decay: float, sample_steps: int,
                 sample_guidance: float, grid_prompts: list[str]):
        """`grid_prompts`: the captions the sample grids show (the data's own: held-out ones
        where there are)."""
        self.cfg = cfg
        self.grid_prompts = list(grid_prompts)
        self.model = LatentDiffusion(cfg)
        if self.model.model_ema is not None:
            self.model.model_ema.decay.fill_(ema_decay)
        self.sample_steps, self.sample_guidance = sample_steps, sample_guidance

    def param_groups(self):
        params = list(self.model.model.parameters())
        if self.cfg.diffusion.cond_stage_trainable:
            params += list(self.model.cond_stage_model.parameters())
        return [params]

    def active_optimizers(self, step: int) -> list[int]:
        return [0]

    def _latents(self, images: torch.Tensor, gens) -> torch.Tensor:
        """z = scale_factor * (mu + sigma * e): the frozen posterior, sampled per sample."""
        with torch.no_grad():
            post = self.model.encode_first_stage(images)
            noise = randomness.randn(gens, post.mean.shape[1:])
            return self.model.scale_factor * (post.mean + post.std * noise)

    def loss(self, batch, gens, step, opt_idx):
        m, d = self.model, self.cfg.diffusion
        z = self._latents(batch["image"], gens)
        # Caption dropout: a fraction of captions become "" so the model also learns eps(x_t, "").
        drop = randomness.rand(gens) < d.cond_drop_prob
        captions = ["" if dr else c for c, dr in zip(batch["caption"], drop.tolist(), strict=True)]
        cond = m.get_learned_conditioning(captions)
        t = randomness.randint(gens, m.num_timesteps)
        noise = randomness.randn(gens, z.shape[1:])
        loss, logs = m.p_losses(z, t, cond, noise=noise)
        return loss, {k: float(v.detach()) for k, v in logs.items()}

    def after_step(self, step: int) -> None:
        if self.model.model_ema is not None:
            self.model.model_ema(self.model.model)

    def validate(self, batches: Iterator[dict]) -> dict[str, float]:
        """EMA-weight loss at fixed noise and timesteps, so values are comparable over time."""
        total, count = 0.0, 0
        with self.model.ema_scope():
            for i, batch in enumerate(batches):
                gens = randomness.sample_generators(12345, i, list(range(len(batch["caption"]))))
                z = self._latents(batch["image"], gens)
                cond = self.model.get_learned_conditioning(batch["caption"])
                t = randomness.randint(gens, self.model.num_timesteps)
                noise = randomness.randn(gens, z.shape[1:])
                loss, _ = self.model.p_losses(z, t, cond, noise=noise)
                total += float(loss) * len(batch["caption"])
                count += len(batch["caption"])
        return {"val/loss_ema": total / max(count, 1)}

    def sample_grid(self, step: int) -> np.ndarray:
        pipe = Txt2ImgPipeline(self.model)
        images = pipe(self.grid_prompts, steps=self.sample_steps,
                      guidance_scale=self.sample_guidance, seed=step)
        return image_grid([images])

    def save_model(self, folder: Path) -> None:
        save_pretrained(folder, self.model, "ldm", self.cfg)

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass
