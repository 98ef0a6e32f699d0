"""Text-to-image LatentDiffusion (Rombach et al. 2022): DDPM on the latents of a frozen autoencoder.

Reproduces CompVis `LatentDiffusion` (`ldm/models/diffusion/ddpm.py`) for the cross-attention
text-to-image path, with its submodule names, so CompVis checkpoints load with
`load_state_dict(strict=True)`. Also importable as `ldm.models.diffusion.LatentDiffusion`.

Symbols: x the image in [-1, 1], E/D the autoencoder's encoder/decoder,
z = scale_factor * E(x) the latent the diffusion runs on, tau(y) the text encoder's context
for caption y (`get_learned_conditioning`).

Train one step (images in [-1, 1], shape (B, 3, H, W)):
    loss, logs = ldm(images, captions, generator=torch.Generator().manual_seed(0))
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ldm.config import LDMConfig
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion import DDPM, draw_noise, draw_timesteps
from ldm.modules.conditioning import make_text_encoder

__all__ = ["LatentDiffusion"]

logger = logging.getLogger(__name__)


class LatentDiffusion(DDPM):
    """Text-to-image latent diffusion: frozen KL autoencoder + BERT text encoder + UNet.

    Submodules (CompVis names): `model.diffusion_model` (UNet), `model_ema`,
    `first_stage_model` (AutoencoderKL, frozen, always in eval mode) and `cond_stage_model`
    (BERTEmbedder, trained when `cond_stage_trainable`; or SD v1's FrozenCLIPEmbedder).
    """

    def __init__(self, cfg: LDMConfig):
        d = cfg.diffusion
        if d.num_timesteps_cond > 1:
            # CompVis noises the conditioning on a short schedule here ("TODO: drop this option").
            raise ValueError("num_timesteps_cond > 1 is not supported (use 1)")
        super().__init__(d, cfg.unet)
        self.config = cfg
        self.num_timesteps_cond = d.num_timesteps_cond
        self.shorten_cond_schedule = False
        self.cond_stage_trainable = d.cond_stage_trainable
        self.cond_stage_key = d.cond_stage_key
        self.cond_drop_prob = d.cond_drop_prob
        self.scale_by_std = d.scale_by_std
        self.num_downs = len(cfg.first_stage.ddconfig.ch_mult) - 1
        # A plain float unless it is estimated from data, in which case it is a checkpointed buffer.
        self.scale_factor: float | Tensor
        if d.scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(d.scale_factor))
        else:
            self.scale_factor = d.scale_factor

        self.first_stage_model = AutoencoderKL(cfg.first_stage)
        self.first_stage_model.requires_grad_(False)
        if d.conditioning_key is not None:
            self.cond_stage_model = make_text_encoder(cfg.cond_stage)
            if not self.cond_stage_trainable:
                self.cond_stage_model.requires_grad_(False)
        self.train(self.training)
        # Latents are not bounded to [-1, 1], so x_0 predictions are never clipped.
        self.clip_denoised = False

    def train(self, mode: bool = True) -> LatentDiffusion:
        """Like nn.Module.train, but frozen stages stay in eval mode (CompVis `disabled_train`)."""
        super().train(mode)
        self.first_stage_model.eval()
        if self.cond_stage_model is not None and not self.cond_stage_trainable:
            self.cond_stage_model.eval()
        return self

    # --- first stage (autoencoder) -------------------------------------------------------

    @torch.no_grad()
    def encode_first_stage(self, x: Tensor) -> Any:
        """Images (B, 3, H, W) in [-1, 1] -> the autoencoder's posterior over latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(
        self, encoder_posterior: Any, generator: torch.Generator | None = None
    ) -> Tensor:
        """Sample z ~ posterior (or take a given tensor) and scale it: scale_factor * z."""
        if isinstance(encoder_posterior, Tensor):
            z = encoder_posterior
        else:
            z = encoder_posterior.sample(generator=generator)
        return self.scale_factor * z

    @torch.no_grad()
    def decode_first_stage(self, z: Tensor) -> Tensor:
        """Latents (B, z_channels, h, w) -> images (B, 3, H, W): decode(z / scale_factor)."""
        return self.differentiable_decode_first_stage(z)

    def differentiable_decode_first_stage(self, z: Tensor) -> Tensor:
        """`decode_first_stage` with gradients (CompVis name)."""
        z = 1.0 / self.scale_factor * z
        return self.first_stage_model.decode(z)

    @torch.no_grad()
    def set_scale_factor_from_batch(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> float:
        """scale_factor = 1 / std of the latents of batch x (CompVis `on_train_batch_start`).

        Call it on the very first training batch only, not when resuming from a checkpoint.
        """
        if not self.scale_by_std:
            raise ValueError("set_scale_factor_from_batch needs diffusion.scale_by_std = true")
        if float(self.scale_factor) != 1.0:
            raise ValueError("scale_factor must be 1.0 before it is estimated from data")
        z = self.get_first_stage_encoding(self.encode_first_stage(x), generator).detach()
        self.scale_factor = 1.0 / z.flatten().std()
        logger.info("set scale_factor to %.6f", float(self.scale_factor))
        return float(self.scale_factor)

    # --- conditioning (text) -------------------------------------------------------------

    def get_learned_conditioning(self, c: list[str]) -> Tensor:
        """Captions -> cross-attention context (B, max_seq_len, n_embed)."""
        if self.cond_stage_model is None:
            raise ValueError("this model is unconditional (conditioning_key is None)")
        return self.cond_stage_model(c)

    @torch.no_grad()
    def encode_text_tokens(self, input_ids: Tensor) -> Tensor:
        """Token ids (B, max_seq_len) -> context (B, max_seq_len, n_embed), no tokenizer."""
        if self.cond_stage_model is None:
            raise ValueError("this model is unconditional (conditioning_key is None)")
        return self.cond_stage_model.embed_tokens(input_ids)

    def drop_captions(
        self, captions: Sequence[str], generator: torch.Generator | None = None
    ) -> list[str]:
        """Replace each caption by "" with probability cond_drop_prob, so one model learns both
        p(x | c) and p(x) for classifier-free guidance (Ho & Salimans 2022)."""
        if self.cond_drop_prob <= 0:
            return list(captions)
        device = generator.device if generator is not None else torch.device("cpu")
        drop = torch.rand(len(captions), generator=generator, device=device) < self.cond_drop_prob
        return ["" if d else c for c, d in zip(captions, drop.tolist(), strict=True)]

    # --- training ------------------------------------------------------------------------

    def forward(  # type: ignore[override]
        self,
        x: Tensor,
        captions: Sequence[str] | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for images x (B, 3, H, W) in [-1, 1] with their captions.

        Steps: 1. encode x to scaled latents z; 2. in training mode, drop captions to "" with
        probability cond_drop_prob; 3. embed the captions (with gradients only when the text
        encoder is trainable); 4. sample t and eps; 5. p_losses. All randomness comes from
        `generator` when one is given.
        """
        z = self.get_first_stage_encoding(self.encode_first_stage(x), generator).detach()
        cond = None
        if self.model.conditioning_key is not None:
            if captions is None:
                raise ValueError("a conditional model needs captions")
            if len(captions) != x.shape[0]:
                raise ValueError(f"{len(captions)} captions for {x.shape[0]} images")
            if self.training:
                captions = self.drop_captions(captions, generator)
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.cond_stage_trainable):
                cond = self.get_learned_conditioning(list(captions))
        t = draw_timesteps(self.num_timesteps, z.shape[0], generator, z.device)
        noise = draw_noise(z.shape, generator, z)
        return self.p_losses(z, t, cond, noise=noise)

    def shared_step(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for a data-loader batch {first_stage_key: (B, 3, H, W), cond_stage_key: [str]}.

        Unlike CompVis (channels-last batches), our data sets yield channels-first images.
        """
        x = batch[self.first_stage_key].to(self.device, memory_format=torch.contiguous_format)
        captions = batch[self.cond_stage_key] if self.model.conditioning_key else None
        return self(x.float(), captions, generator)
