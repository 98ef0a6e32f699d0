"""DDPM (Ho et al. 2020), the base of text-to-image LatentDiffusion (Rombach et al. 2022).

Reproduces CompVis `ldm/models/diffusion/ddpm.py` for the cross-attention text-to-image path:
same module nesting, parameter and buffer names (so CompVis checkpoints load with
`load_state_dict(strict=True)`) and the same numerics. PyTorch-Lightning hooks, image logging,
concat/hybrid conditioning and split-input (patch-wise) processing are left out.
`LatentDiffusion` lives in `ldm.models.latent_diffusion` and is importable from here too; the
schedule math is `ldm.models.schedule.schedule_arrays`.

Symbols (Ho et al. 2020), with the buffer that holds them:
    beta_t                      betas
    alpha_t = 1 - beta_t
    alpha_bar_t                 alphas_cumprod          (prod of alpha_s, s <= t)
    alpha_bar_{t-1}             alphas_cumprod_prev
    q(x_t | x_0)  = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)
    q(x_{t-1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, beta_tilde_t I)      (eq. 6-7)
        beta_tilde_t            posterior_variance
        coef1, coef2            posterior_mean_coef1, posterior_mean_coef2
    eps                         the noise added by q_sample; the "eps" parameterisation predicts it
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.config import DiffusionConfig, UNetConfig
from ldm.models.schedule import (
    BETA_SCHEDULES,
    extract_into_tensor,
    make_beta_schedule,
    schedule_arrays,
    schedule_betas,
)
from ldm.modules.ema import LitEma
from ldm.modules.unet import UNetModel

if TYPE_CHECKING:
    from ldm.models.latent_diffusion import LatentDiffusion

__all__ = [
    "DDPM",
    "DiffusionWrapper",
    "LatentDiffusion",
    "make_beta_schedule",
]

logger = logging.getLogger(__name__)

PARAMETERIZATIONS = ("eps", "x0")
LOSS_TYPES = ("l1", "l2")
CONDITIONING_KEYS = (None, "crossattn")

Cond = Tensor | Sequence[Tensor] | Mapping[str, Any] | None


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {list(allowed)}")


def draw_noise(shape: Sequence[int], generator: torch.Generator | None, like: Tensor) -> Tensor:
    """eps ~ N(0, I) of `shape`, drawn on the generator's device, returned on like's."""
    device = generator.device if generator is not None else like.device
    return torch.randn(tuple(shape), generator=generator, device=device).to(like)


def draw_timesteps(
    high: int, n: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """n timesteps uniform in [0, high), as a long tensor on `device`."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (n,), generator=generator, device=gen_device).to(device)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` and routes the conditioning to it (CompVis name).

    Only the unconditional (None) and cross-attention ("crossattn") routes are supported.
    """

    def __init__(self, unet_cfg: UNetConfig, conditioning_key: str | None):
        super().__init__()
        _check_choice("conditioning_key", conditioning_key, CONDITIONING_KEYS)
        self.diffusion_model = UNetModel(unet_cfg)
        self.conditioning_key = conditioning_key

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        c_concat: list[Tensor] | None = None,
        c_crossattn: list[Tensor] | None = None,
    ) -> Tensor:
        """x: (B, C, H, W), t: (B,), c_crossattn: list of (B, L_i, D) -> (B, C_out, H, W)."""
        if self.conditioning_key is None:
            return self.diffusion_model(x, t)
        if c_concat is not None:
            raise ValueError("concat conditioning is not supported (conditioning_key='crossattn')")
        if c_crossattn is None:
            raise ValueError("conditioning_key='crossattn' needs c_crossattn")
        # Several context tensors are joined along the token axis, as CompVis does.
        context = torch.cat(list(c_crossattn), dim=1)
        return self.diffusion_model(x, t, context=context)


class DDPM(nn.Module):
    """Gaussian diffusion with a fixed variance schedule around a UNet (CompVis `DDPM`).

    Buffers (all float32, shape (T,)): betas, alphas_cumprod, alphas_cumprod_prev,
    sqrt_alphas_cumprod, sqrt_one_minus_alphas_cumprod, log_one_minus_alphas_cumprod,
    sqrt_recip_alphas_cumprod, sqrt_recipm1_alphas_cumprod, posterior_variance,
    posterior_log_variance_clipped, posterior_mean_coef1, posterior_mean_coef2 and the
    non-persistent lvlb_weights.
    """

    def __init__(self, cfg: DiffusionConfig, unet: UNetConfig):
        super().__init__()
        _check_choice("parameterization", cfg.parameterization, PARAMETERIZATIONS)
        _check_choice("loss_type", cfg.loss_type, LOSS_TYPES)
        self.cfg = cfg
        self.parameterization = cfg.parameterization
        self.loss_type = cfg.loss_type
        self.clip_denoised = cfg.clip_denoised
        self.first_stage_key = cfg.first_stage_key
        self.image_size = cfg.image_size
        self.channels = cfg.channels
        self.cond_stage_model: nn.Module | None = None

        self.model = DiffusionWrapper(unet, cfg.conditioning_key)
        self.use_ema = cfg.use_ema
        # None (not absent) without EMA, so callers can test `model.model_ema is not None`.
        self.model_ema: LitEma | None = LitEma(self.model) if self.use_ema else None

        # sigma_t^2 = (1 - v) beta_tilde_t + v beta_t (Ho et al. sec. 3.2: both are valid choices)
        self.v_posterior = cfg.v_posterior
        self.original_elbo_weight = cfg.original_elbo_weight
        self.l_simple_weight = cfg.l_simple_weight
        self.register_schedule(
            given_betas=cfg.given_betas,
            beta_schedule=cfg.beta_schedule,
            timesteps=cfg.timesteps,
            linear_start=cfg.linear_start,
            linear_end=cfg.linear_end,
            cosine_s=cfg.cosine_s,
        )

        # Per-timestep log-variance of the loss (Kendall-style weighting). CompVis keeps it as a
        # plain tensor (not in the state dict, not moved by .to()) unless it is learned.
        self.learn_logvar = cfg.learn_logvar
        logvar = torch.full((self.num_timesteps,), cfg.logvar_init)
        self.logvar: Tensor = nn.Parameter(logvar) if cfg.learn_logvar else logvar

    # --- schedule ------------------------------------------------------------------------

    def register_schedule(
        self,
        given_betas: Sequence[float] | np.ndarray | None = None,
        beta_schedule: str = "linear",
        timesteps: int = 1000,
        linear_start: float = 1e-4,
        linear_end: float = 2e-2,
        cosine_s: float = 8e-3,
    ) -> None:
        """Register the schedule buffers: computed in float64 numpy, stored as float32."""
        if given_betas is None:
            _check_choice("beta_schedule", beta_schedule, BETA_SCHEDULES)
        betas = schedule_betas(
            given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s  # type: ignore[arg-type]
        )
        self.num_timesteps = int(betas.shape[0])
        self.linear_start = linear_start
        self.linear_end = linear_end
        arrays = schedule_arrays(betas, self.v_posterior)
        # Registered in CompVis's order, so the state-dict keys come in the same order.
        for name, value in arrays.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))
        lvlb_weights = self._lvlb_weights(1.0 - betas, arrays["alphas_cumprod"])
        self.register_buffer("lvlb_weights", lvlb_weights, persistent=False)
        if torch.isnan(self.lvlb_weights).all():
            raise ValueError("lvlb_weights are all NaN: check the beta schedule")

    def _lvlb_weights(self, alphas: np.ndarray, alphas_cumprod: np.ndarray) -> Tensor:
        """Weights that turn the simple loss into the VLB term L_{t-1} (Ho et al. eq. 12).

        alphas (alpha_t) and alphas_cumprod (alpha_bar_t) come in float64; the weights are
        computed in float32 from the float32 buffers, as CompVis does.
        """
        if self.parameterization == "eps":
            lvlb_weights = self.betas**2 / (
                2
                * self.posterior_variance
                * torch.tensor(alphas, dtype=torch.float32)
                * (1 - self.alphas_cumprod)
            )
        else:
            # CompVis writes `2. * 1 - alphas_cumprod` (= 2 - alpha_bar); kept for parity. The
            # float32 sqrt is numpy's: torch's CPU sqrt differs from it in the last bit.
            acp = torch.tensor(alphas_cumprod, dtype=torch.float32)
            lvlb_weights = 0.5 * torch.from_numpy(np.sqrt(acp.numpy())) / (2.0 * 1 - acp)
        # L_0 is a decoder term, not a KL; CompVis reuses the weight of t=1 (beta_tilde_0 = 0).
        lvlb_weights[0] = lvlb_weights[1]
        return lvlb_weights

    @property
    def device(self) -> torch.device:
        return self.betas.device

    # --- EMA -----------------------------------------------------------------------------

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """Temporarily swap the EMA weights into `self.model`; the training weights come back."""
        if self.use_ema:
            self.model_ema.store(self.model.parameters())
            self.model_ema.copy_to(self.model)
            if context is not None:
                logger.info("%s: switched to EMA weights", context)
        try:
            yield None
        finally:
            if self.use_ema:
                self.model_ema.restore(self.model.parameters())
                if context is not None:
                    logger.info("%s: restored training weights", context)

    def update_ema(self) -> None:
        """One EMA step of `model_ema` towards `model` (CompVis `on_train_batch_end`)."""
        if self.use_ema:
            self.model_ema(self.model)

    # --- forward process q ---------------------------------------------------------------

    def q_mean_variance(self, x_start: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and log-variance of q(x_t | x_0); x_start: (B, ...), t: (B,)."""
        mean = extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
        variance = extract_into_tensor(1.0 - self.alphas_cumprod, t, x_start.shape)
        log_variance = extract_into_tensor(self.log_one_minus_alphas_cumprod, t, x_start.shape)
        return mean, variance, log_variance

    def q_sample(self, x_start: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps; x_start: (B, ...), t: (B,)."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start.shape) * x_start
            + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape) * noise
        )

    def predict_start_from_noise(self, x_t: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_0 = sqrt(1/alpha_bar_t) x_t - sqrt(1/alpha_bar_t - 1) eps."""
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t
            - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * noise
        )

    def predict_eps_from_start(self, x_t: Tensor, t: Tensor, pred_xstart: Tensor) -> Tensor:
        """The inverse of `predict_start_from_noise` (CompVis `_predict_eps_from_xstart`)."""
        return (
            extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - pred_xstart
        ) / extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def q_posterior(
        self, x_start: Tensor, x_t: Tensor, t: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0) (eq. 6-7)."""
        mean = (
            extract_into_tensor(self.posterior_mean_coef1, t, x_t.shape) * x_start
            + extract_into_tensor(self.posterior_mean_coef2, t, x_t.shape) * x_t
        )
        variance = extract_into_tensor(self.posterior_variance, t, x_t.shape)
        log_variance = extract_into_tensor(self.posterior_log_variance_clipped, t, x_t.shape)
        return mean, variance, log_variance

    # --- reverse process p ---------------------------------------------------------------

    def apply_model(self, x_noisy: Tensor, t: Tensor, cond: Cond = None) -> Tensor:
        """Run the UNet. cond: a (B, L, D) context, a list of them, or a dict of wrapper kwargs
        such as {"c_crossattn": [context]}. Returns eps or x_0 as x_noisy's shape."""
        if not isinstance(cond, Mapping):
            cond_list = list(cond) if isinstance(cond, (list, tuple)) else [cond]
            cond = {"c_crossattn": cond_list} if self.model.conditioning_key else {}
        out = self.model(x_noisy, t, **cond)
        # CompVis returns the first element when a model answers with a tuple (codebook ids).
        return out[0] if isinstance(out, tuple) else out

    def p_mean_variance(
        self,
        x: Tensor,
        t: Tensor,
        cond: Cond = None,
        clip_denoised: bool | None = None,
        return_x0: bool = False,
    ) -> tuple[Tensor, ...]:
        """Mean, variance, log-variance of p(x_{t-1} | x_t) (and x_0_hat with return_x0)."""
        if clip_denoised is None:
            clip_denoised = self.clip_denoised
        model_out = self.apply_model(x, t, cond)
        if self.parameterization == "eps":
            x_recon = self.predict_start_from_noise(x, t=t, noise=model_out)
        else:
            x_recon = model_out
        if clip_denoised:
            x_recon = x_recon.clamp(-1.0, 1.0)
        mean, variance, log_variance = self.q_posterior(x_start=x_recon, x_t=x, t=t)
        if return_x0:
            return mean, variance, log_variance, x_recon
        return mean, variance, log_variance

    @torch.no_grad()
    def p_sample(
        self,
        x: Tensor,
        t: Tensor,
        cond: Cond = None,
        clip_denoised: bool | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """One ancestral step x_t -> x_{t-1}; no noise is added where t == 0."""
        mean, _, log_variance = self.p_mean_variance(x, t, cond, clip_denoised)
        noise = draw_noise(x.shape, generator, x)
        nonzero = (t != 0).to(x.dtype).reshape(x.shape[0], *((1,) * (x.dim() - 1)))
        return mean + nonzero * (0.5 * log_variance).exp() * noise

    # --- training loss -------------------------------------------------------------------

    def get_loss(self, pred: Tensor, target: Tensor, mean: bool = True) -> Tensor:
        """L1 or L2 between prediction and target; elementwise when mean=False."""
        if self.loss_type == "l1":
            loss = (target - pred).abs()
            return loss.mean() if mean else loss
        return F.mse_loss(target, pred, reduction="mean" if mean else "none")

    def p_losses(
        self, x_start: Tensor, t: Tensor, cond: Cond = None, noise: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Training loss at timesteps t for clean x_start (B, C, H, W) (CompVis LDM p_losses).

        loss = l_simple_weight * mean_b(L_simple / exp(logvar_t) + logvar_t)
               + original_elbo_weight * mean_b(lvlb_weights[t] * L_simple)
        where L_simple is the per-sample mean of ||target - model output||.
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_noisy = self.q_sample(x_start=x_start, t=t, noise=noise)
        model_output = self.apply_model(x_noisy, t, cond)
        target = noise if self.parameterization == "eps" else x_start

        prefix = "train" if self.training else "val"
        reduce_dims = list(range(1, model_output.dim()))
        loss_simple = self.get_loss(model_output, target, mean=False).mean(reduce_dims)
        loss_dict = {f"{prefix}/loss_simple": loss_simple.mean()}

        logvar_t = self.logvar[t.to(self.logvar.device)].to(x_start.device)
        loss = loss_simple / torch.exp(logvar_t) + logvar_t
        if self.learn_logvar:
            loss_dict[f"{prefix}/loss_gamma"] = loss.mean()
            loss_dict["logvar"] = self.logvar.data.mean()
        loss = self.l_simple_weight * loss.mean()

        loss_vlb = (self.lvlb_weights[t] * loss_simple).mean()
        loss_dict[f"{prefix}/loss_vlb"] = loss_vlb
        loss = loss + self.original_elbo_weight * loss_vlb
        loss_dict[f"{prefix}/loss"] = loss
        return loss, loss_dict

    def forward(
        self, x: Tensor, cond: Cond = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss for clean x (B, C, H, W) at uniformly sampled timesteps and fresh noise."""
        t = draw_timesteps(self.num_timesteps, x.shape[0], generator, x.device)
        noise = draw_noise(x.shape, generator, x)
        return self.p_losses(x, t, cond, noise=noise)


def __getattr__(name: str) -> Any:
    """`LatentDiffusion` on first access (PEP 562): latent_diffusion.py imports DDPM from here,
    so importing it eagerly would make the two modules import each other."""
    if name == "LatentDiffusion":
        from ldm.models.latent_diffusion import LatentDiffusion

        return LatentDiffusion
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
