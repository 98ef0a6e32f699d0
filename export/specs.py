"""One export spec per exported model: the single source of tensor names, shapes and profiles.

The ONNX export, the parity check, the TensorRT engine build, the Triton `config.pbtxt`
writer and the serving clients all read these specs, so a tensor is called the same thing
everywhere (lowercase snake_case):

    text_encoder: input_ids (B, 77) int64                  -> context (B, 77, D) fp32
    unet:         latent (B, C, h, w) fp32, timestep (B,) int64, context (B, 77, D) fp32
                                                           -> noise_pred (B, C, h, w) fp32
    vae_decoder:  latent (B, C, h, w) fp32                 -> image (B, 3, H, W) fp32 in [-1, 1]
    vae_encoder:  image (B, 3, H, W) fp32 in [-1, 1]       -> mean, logvar (B, C, h, w) fp32

`latent` is always the diffusion model's latent, i.e. already multiplied by scale_factor:
the VAE graphs apply 1/scale_factor (decoder) and scale_factor (encoder) themselves.
`noise_pred` is the UNet's raw output (eps for eps-parameterized models).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ldm.config import LDMConfig


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy dtype name: "float32", "int64"
    shape: tuple[int | str, ...]  # ints are fixed; strings name a dynamic axis


@dataclass(frozen=True)
class ShapeLimits:
    """Batch and latent-size ranges the exported graphs (and TensorRT profiles) cover."""

    max_batch: int = 0  # images per request x concurrent requests batched; 0: auto_max_batch
    min_latent: int = 0  # 0: the model's trained latent size only
    max_latent: int = 0


@dataclass(frozen=True)
class ExportSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    # Per dynamic axis name: (min, opt, max), for TensorRT profiles and the parity check.
    profile: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    # Triton merges concurrent requests into one execution (the UNet: denoising steps of
    # different requests). Every tensor's leading axis is "batch".
    dynamic_batching: bool = False
    # Per integer input: the values it may hold, [low, high) (token ids within the
    # vocabulary, timesteps within the schedule). Served models refuse others.
    value_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    # Arithmetic of the network's TensorRT engine. The VAE's GroupNorms over 512x512
    # activations are this architecture's classic fp16 overflow (a NaN, then a black image
    # through the uint8 conversion), so the VAE stays fp32: a few % of the per-image time.
    engine_precision: Literal["fp16", "fp32"] = "fp16"

    @property
    def max_batch_size(self) -> int:
        """The largest batch the graphs (and the TensorRT profile) are built for."""
        return self.profile["batch"][2]

    @property
    def dynamic_axes(self) -> dict[str, dict[int, str]]:
        """torch.onnx.export's dynamic_axes: tensor name -> {axis index: axis name}."""
        axes = {}
        for t in (*self.inputs, *self.outputs):
            dyn = {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
            if dyn:
                axes[t.name] = dyn
        return axes

    def serving_limits(self) -> dict:
        """What a served model accepts beyond names and dtypes: {"axes": {axis: [min, max]},
        "values": {input: [low, high)}}; written into the Python-backend model's config."""
        return {"axes": {axis: [lo, hi] for axis, (lo, _, hi) in self.profile.items()},
                "values": {k: list(v) for k, v in self.value_ranges.items()}}

    def concrete_shape(self, tensor: TensorSpec, which: int = 1, **override: int) -> tuple:
        """The shape of `tensor` at profile point `which` (0 min, 1 opt, 2 max)."""
        dims = []
        for d in tensor.shape:
            if isinstance(d, str):
                dims.append(override.get(d, self.profile[d][which]))
            else:
                dims.append(d)
        return tuple(dims)

    def sample_inputs(self, which: int = 1, generator: torch.Generator | None = None,
                      **override: int) -> dict[str, torch.Tensor]:
        """Random inputs at a profile point, in spec order (used for export and parity)."""
        out = {}
        for t in self.inputs:
            shape = self.concrete_shape(t, which, **override)
            if t.dtype == "int64":
                low, high = self.value_ranges.get(t.name, (0, 1000))
                out[t.name] = torch.randint(low, min(high, low + 1000), shape,
                                            generator=generator)
            else:
                out[t.name] = torch.randn(shape, generator=generator)
        return out


def latent_range(cfg: LDMConfig, limits: ShapeLimits) -> tuple[int, int, int]:
    size = cfg.latent_size
    factor = 2 ** (len(cfg.unet.channel_mult) - 1)  # the UNet halves the latent this often
    lo = limits.min_latent or size
    hi = limits.max_latent or size
    if lo % factor or hi % factor:
        raise ValueError(f"latent sizes must be multiples of {factor}, got {lo}..{hi}")
    return (lo, size, hi)


def auto_max_batch(latent: int) -> int:
    """Images per batch when not given: 8 up to 32x32 latents (256 px at f=8), fewer above so
    that the largest batch holds as many latent pixels (SD's 64x64: 2). The parity check and
    the engines run the largest batch; its self-attention grows with the pixels squared (the
    UNet's at 64x64 and batch 16 would need 8.6 GB per attention matrix)."""
    return max(1, min(8, 8 * 32 * 32 // (latent * latent)))


def build_specs(cfg: LDMConfig, limits: ShapeLimits = ShapeLimits()) -> dict[str, ExportSpec]:
    """The four specs for a LatentDiffusion config."""
    seq, dim = cfg.cond_stage.max_seq_len, cfg.cond_stage.n_embed
    c = cfg.unet.in_channels
    f = 2 ** (len(cfg.first_stage.ddconfig.ch_mult) - 1)
    lat = latent_range(cfg, limits)
    img = tuple(v * f for v in lat)
    max_batch = limits.max_batch or auto_max_batch(lat[2])
    batch = (1, 1, max_batch)
    # Classifier-free guidance doubles the UNet batch: [uncond, cond] in one call.
    unet_batch = (1, 2, 2 * max_batch)
    f32 = "float32"
    return {
        "text_encoder": ExportSpec(
            "text_encoder",
            (TensorSpec("input_ids", "int64", ("batch", seq)),),
            (TensorSpec("context", f32, ("batch", seq, dim)),),
            {"batch": batch},
            value_ranges={"input_ids": (0, cfg.cond_stage.vocab_size)},
        ),
        "unet": ExportSpec(
            "unet",
            (TensorSpec("latent", f32, ("batch", c, "height", "width")),
             TensorSpec("timestep", "int64", ("batch",)),
             TensorSpec("context", f32, ("batch", seq, dim))),
            (TensorSpec("noise_pred", f32, ("batch", cfg.unet.out_channels, "height", "width")),),
            {"batch": unet_batch, "height": lat, "width": lat},
            dynamic_batching=True,
            value_ranges={"timestep": (0, cfg.diffusion.timesteps)},
        ),
        "vae_decoder": ExportSpec(
            "vae_decoder",
            (TensorSpec("latent", f32, ("batch", cfg.first_stage.embed_dim, "height", "width")),),
            (TensorSpec("image", f32, ("batch", 3, "image_height", "image_width")),),
            {"batch": batch, "height": lat, "width": lat, "image_height": img,
             "image_width": img},
            engine_precision="fp32",
        ),
        "vae_encoder": ExportSpec(
            "vae_encoder",
            (TensorSpec("image", f32, ("batch", 3, "image_height", "image_width")),),
            (TensorSpec("mean", f32, ("batch", cfg.first_stage.embed_dim, "height", "width")),
             TensorSpec("logvar", f32, ("batch", cfg.first_stage.embed_dim, "height", "width"))),
            {"batch": batch, "height": lat, "width": lat, "image_height": img,
             "image_width": img},
            engine_precision="fp32",
        ),
    }


# --- the PyTorch modules that are exported, one per spec ------------------------------------

class TextEncoderGraph(nn.Module):
    """input_ids -> context (the tokenizer stays in Python)."""

    def __init__(self, model):
        super().__init__()
        self.cond_stage_model = model.cond_stage_model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.cond_stage_model.embed_tokens(input_ids)


class UNetGraph(nn.Module):
    """(latent, timestep, context) -> noise_pred: the raw UNet (EMA weights if applied)."""

    def __init__(self, model):
        super().__init__()
        self.diffusion_model = model.model.diffusion_model

    def forward(self, latent, timestep, context):
        return self.diffusion_model(latent, timestep, context=context)


class VAEDecoderGraph(nn.Module):
    """latent (scaled) -> image in [-1, 1]; applies 1/scale_factor inside the graph."""

    def __init__(self, model):
        super().__init__()
        self.first_stage_model = model.first_stage_model
        self.scale = float(model.scale_factor)

    def forward(self, latent):
        return self.first_stage_model.decode(latent / self.scale)


class VAEEncoderGraph(nn.Module):
    """image -> (mean, logvar) of the scaled latent posterior: scale_factor * z."""

    def __init__(self, model):
        super().__init__()
        self.first_stage_model = model.first_stage_model
        self.scale = float(model.scale_factor)

    def forward(self, image):
        post = self.first_stage_model.encode(image)
        # z' = s z  =>  mean' = s mean, var' = s^2 var  =>  logvar' = logvar + 2 log s
        return post.mean * self.scale, post.logvar + 2 * torch.log(torch.tensor(self.scale))


GRAPHS = {"text_encoder": TextEncoderGraph, "unet": UNetGraph,
          "vae_decoder": VAEDecoderGraph, "vae_encoder": VAEEncoderGraph}
