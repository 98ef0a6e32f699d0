"""The model every contender runs, and its twin built from `diffusers` parts.

Where the LatentDiffusion comes from (`resolve_source`):

- `--quick`: the tiny test model (tests/fixtures/tiny_ldm.yaml), random weights;
- `--checkpoint DIR`: our checkpoint format (config.yaml + model.safetensors);
- `--random-demo-architecture`, or no checkpoint at checkpoints/demo/ldm: the demo model's
  architecture (configs/shapes/ldm.yaml + the first stage of configs/shapes/autoencoder.yaml)
  with seeded random weights;
- otherwise checkpoints/demo/ldm.

Speed does not depend on weight values (no data-dependent control flow), so random weights
measure the same work. CompVis zero-initialises some output layers; those are perturbed so
no network runs on exact zeros.

`diffusers_twin(cfg)` maps our config onto diffusers' `UNet2DConditionModel`, `AutoencoderKL`
and `LDMBertModel` (diffusers' port of CompVis's LDM-BERT) with random weights, and a
`DDIMScheduler` configured as CompVis's DDIM (scaled-linear betas, "leading" spacing with
offset 1, final alpha abar_0). `param_counts` lets the report show the two are the same size.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from ldm.config import LDMConfig, from_dict

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEMO_CHECKPOINT = PROJECT_ROOT / "checkpoints" / "demo" / "ldm"
DEMO_LDM_YAML = PROJECT_ROOT / "configs" / "shapes" / "ldm.yaml"
DEMO_AE_YAML = PROJECT_ROOT / "configs" / "shapes" / "autoencoder.yaml"
TINY_YAML = PROJECT_ROOT / "tests" / "fixtures" / "tiny_ldm.yaml"
# scale_factor of the random demo model (ldm.yaml says 0 = estimate from data, which needs a
# trained autoencoder and data); any positive value costs the same.
RANDOM_SCALE_FACTOR = 1.0


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "checkpoint", "random-demo" or "tiny"
    path: Path | None  # the checkpoint folder (for kind "checkpoint")

    def describe(self) -> str:
        if self.kind == "checkpoint":
            return f"checkpoint {self.path}"
        if self.kind == "random-demo":
            return "demo architecture (configs/shapes), random weights"
        return "tiny test model (tests/fixtures/tiny_ldm.yaml), random weights"


def resolve_source(checkpoint: Path | None, random_demo: bool, quick: bool) -> ModelSource:
    if quick:
        return ModelSource("tiny", None)
    if checkpoint is not None:
        if not (Path(checkpoint) / "config.yaml").is_file():
            raise FileNotFoundError(f"--checkpoint {checkpoint}: no config.yaml (not one of our "
                                    "checkpoint folders)")
        return ModelSource("checkpoint", Path(checkpoint))
    if random_demo or not (DEMO_CHECKPOINT / "config.yaml").is_file():
        return ModelSource("random-demo", None)
    return ModelSource("checkpoint", DEMO_CHECKPOINT)


def demo_config() -> LDMConfig:
    """configs/shapes/ldm.yaml's model with configs/shapes/autoencoder.yaml's first stage."""
    model = yaml.safe_load(DEMO_LDM_YAML.read_text())["model"]
    first_stage = dict(yaml.safe_load(DEMO_AE_YAML.read_text())["model"])
    first_stage.pop("lossconfig", None)  # inside an LDM the first stage carries no loss
    model["first_stage"] = first_stage
    model["diffusion"]["scale_factor"] = RANDOM_SCALE_FACTOR
    model["diffusion"]["scale_by_std"] = False
    return from_dict(LDMConfig, model)


def tiny_config() -> LDMConfig:
    return from_dict(LDMConfig, yaml.safe_load(TINY_YAML.read_text()))


def random_ldm(cfg: LDMConfig, seed: int = 0):
    """A LatentDiffusion with seeded random weights; zero-inits perturbed, EMA = weights."""
    from ldm.models.diffusion import LatentDiffusion

    torch.manual_seed(seed)
    model = LatentDiffusion(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0.0, 0.02)
        if model.model_ema is not None:
            for name, p in model.model.named_parameters():
                getattr(model.model_ema, model.model_ema.m_name2s_name[name]).copy_(p)
    return model.eval()


def load_source(source: ModelSource, work_dir: Path) -> tuple[object, Path]:
    """(LatentDiffusion in eval mode with the EMA weights applied, checkpoint folder).

    Random models are saved to `work_dir` so the export step can read them; the same seed
    gives the same bytes, so the export cache is reused from run to run.
    """
    from ldm.pretrained import load_pretrained, save_pretrained

    if source.kind == "checkpoint":
        folder = source.path
        model = load_pretrained(folder)
    else:
        cfg = demo_config() if source.kind == "random-demo" else tiny_config()
        model = random_ldm(cfg)
        folder = work_dir / f"{source.kind}-checkpoint"
        save_pretrained(folder, model, "ldm", cfg)
    # The served graphs carry the EMA weights (export/repository.py); the in-process
    # pipelines use the same ones, copied in once rather than swapped in on every call.
    if getattr(model, "use_ema", False) and model.model_ema is not None:
        model.model_ema.copy_to(model.model)
    return model.eval(), folder


# --- the diffusers twin --------------------------------------------------------------------

def unet_heads(cfg) -> list[int]:
    """Attention heads per UNet level, by CompVis's rule (num_head_channels wins)."""
    heads = []
    for mult in cfg.channel_mult:
        ch = cfg.model_channels * mult
        heads.append(ch // cfg.num_head_channels if cfg.num_head_channels != -1
                     else cfg.num_heads)
    return heads


def diffusers_unet_kwargs(cfg) -> dict:
    """UNet2DConditionModel arguments for our UNetConfig (spatial-transformer UNets only)."""
    if not cfg.use_spatial_transformer or cfg.context_dim is None:
        raise ValueError("the diffusers twin needs a cross-attention UNet "
                         "(use_spatial_transformer with context_dim)")
    levels = len(cfg.channel_mult)
    # CompVis puts attention at level i when its downsampling rate 2**i is listed.
    attn = [2**i in cfg.attention_resolutions for i in range(levels)]
    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn))
    return dict(
        sample_size=cfg.image_size,
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(cfg.model_channels * m for m in cfg.channel_mult),
        layers_per_block=cfg.num_res_blocks,
        cross_attention_dim=cfg.context_dim,
        # diffusers' legacy naming: `attention_head_dim` is the number of heads per block.
        attention_head_dim=tuple(unet_heads(cfg)),
        transformer_layers_per_block=cfg.transformer_depth,
        norm_num_groups=32,
        flip_sin_to_cos=True,  # CompVis timestep_embedding: [cos, sin]
        freq_shift=0,
        use_linear_projection=False,  # CompVis SpatialTransformer: 1x1 conv proj_in/out
        resnet_time_scale_shift="scale_shift" if cfg.use_scale_shift_norm else "default",
    )


def diffusers_vae_kwargs(cfg, scale_factor: float) -> dict:
    """AutoencoderKL arguments for our AutoencoderConfig."""
    dd = cfg.ddconfig
    if cfg.embed_dim != dd.z_channels:
        raise ValueError("diffusers' AutoencoderKL needs embed_dim == z_channels")
    res = [dd.resolution // 2**i for i in range(len(dd.ch_mult))]
    attn = [r in dd.attn_resolutions for r in res]
    return dict(
        in_channels=dd.in_channels,
        out_channels=dd.out_ch,
        down_block_types=tuple("AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D"
                               for a in attn),
        up_block_types=tuple("AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D"
                             for a in reversed(attn)),
        block_out_channels=tuple(dd.ch * m for m in dd.ch_mult),
        layers_per_block=dd.num_res_blocks,
        latent_channels=dd.z_channels,
        norm_num_groups=32,
        sample_size=dd.resolution,
        scaling_factor=scale_factor,
    )


def ldmbert_kwargs(cfg) -> dict:
    """LDMBertConfig arguments for our TextEncoderConfig (x-transformers: 8 heads of 64)."""
    return dict(vocab_size=cfg.vocab_size, max_position_embeddings=cfg.max_seq_len,
                encoder_layers=cfg.n_layer, encoder_ffn_dim=4 * cfg.n_embed,
                encoder_attention_heads=8, head_dim=64, d_model=cfg.n_embed, dropout=0.0)


@dataclass
class DiffusersTwin:
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    scheduler: object
    scale_factor: float
    max_seq_len: int


def diffusers_twin(cfg: LDMConfig, scale_factor: float, seed: int = 0) -> DiffusersTwin:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from diffusers.pipelines.latent_diffusion.pipeline_latent_diffusion import (
        LDMBertConfig,
        LDMBertModel,
    )

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**diffusers_unet_kwargs(cfg.unet)).eval()
    vae = AutoencoderKL(**diffusers_vae_kwargs(cfg.first_stage, scale_factor)).eval()
    bert = LDMBertModel(LDMBertConfig(**ldmbert_kwargs(cfg.cond_stage))).eval()
    d = cfg.diffusion
    if d.beta_schedule != "linear":
        raise ValueError(f"beta_schedule {d.beta_schedule!r}: the twin maps only 'linear'")
    scheduler = DDIMScheduler(
        num_train_timesteps=d.timesteps, beta_start=d.linear_start, beta_end=d.linear_end,
        beta_schedule="scaled_linear",  # CompVis "linear" = linspace of sqrt(beta), squared
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon")
    return DiffusersTwin(unet, vae, bert, scheduler, scale_factor, cfg.cond_stage.max_seq_len)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_counts(model, twin: DiffusersTwin) -> dict[str, dict[str, int]]:
    """{"unet"|"vae"|"text_encoder": {"ours": n, "diffusers": n}}."""
    return {
        "unet": {"ours": n_params(model.model.diffusion_model), "diffusers": n_params(twin.unet)},
        "vae": {"ours": n_params(model.first_stage_model), "diffusers": n_params(twin.vae)},
        "text_encoder": {"ours": n_params(model.cond_stage_model),
                         "diffusers": n_params(twin.text_encoder)},
    }


def config_summary(cfg: LDMConfig) -> dict:
    return {"unet": dataclasses.asdict(cfg.unet),
            "first_stage": dataclasses.asdict(cfg.first_stage.ddconfig),
            "cond_stage": dataclasses.asdict(cfg.cond_stage)}
