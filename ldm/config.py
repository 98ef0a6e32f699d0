"""Typed configs for every model part, loaded from YAML and validated.

Field names are CompVis's constructor arguments, so a CompVis YAML `params:` block maps onto
these dataclasses one to one (see `ldm.compat`). Unknown keys and bad values raise
`ConfigError` naming the key and, for enumerations, the allowed values.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key or value is invalid; the message names it."""


@dataclass
class DDConfig:
    """Encoder/decoder shape of the KL autoencoder (CompVis `ddconfig`)."""

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = ()
    z_channels: int = 4
    double_z: bool = True
    resolution: int = 256
    in_channels: int = 3
    out_ch: int = 3
    dropout: float = 0.0

    def __post_init__(self) -> None:
        # Every block normalises with GroupNorm(32 groups): its widths must divide by 32.
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % 32]
        if bad:
            raise ConfigError(f"ddconfig.ch={self.ch} with ch_mult={list(self.ch_mult)} gives "
                              f"{bad[0]} channels; every width must be a multiple of 32 "
                              "(GroupNorm's 32 groups)")


@dataclass
class LossConfig:
    """`LPIPSWithDiscriminator` settings (CompVis names)."""

    disc_start: int = 50001
    logvar_init: float = 0.0
    kl_weight: float = 1e-6
    pixelloss_weight: float = 1.0
    disc_num_layers: int = 3
    disc_in_channels: int = 3
    disc_factor: float = 1.0
    disc_weight: float = 0.5
    perceptual_weight: float = 1.0
    use_actnorm: bool = False
    disc_conditional: bool = False
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    # Perceptual backbone: "efficientnet_lite0" ships in a package and runs offline here;
    # "vgg16" is the LPIPS of the paper and needs `vgg16_weights` (a torchvision-format file).
    perceptual_backbone: Literal["efficientnet_lite0", "vgg16"] = "efficientnet_lite0"
    vgg16_weights: str | None = None
    lpips_heads: str | None = None


@dataclass
class AutoencoderConfig:
    """`AutoencoderKL`: ddconfig, latent channels and (for training) the loss."""

    ddconfig: DDConfig = field(default_factory=DDConfig)
    embed_dim: int = 4
    # None means no loss module (CompVis `lossconfig: torch.nn.Identity`), as inside an LDM.
    lossconfig: LossConfig | None = None


@dataclass
class UNetConfig:
    """`UNetModel` hyperparameters (CompVis `openaimodel.UNetModel`)."""

    image_size: int = 32
    in_channels: int = 4
    model_channels: int = 320
    out_channels: int = 4
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (4, 2, 1)
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    conv_resample: bool = True
    dims: int = 2
    num_classes: int | None = None
    use_checkpoint: bool = False
    use_fp16: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    use_spatial_transformer: bool = False
    transformer_depth: int = 1
    context_dim: int | None = None
    n_embed: int | None = None
    legacy: bool = True


@dataclass
class TextEncoderConfig:
    """`BERTEmbedder`: BERT tokenizer + x-transformers-style encoder (CompVis names)."""

    kind: Literal["bert"] = "bert"
    n_embed: int = 1280
    n_layer: int = 32
    vocab_size: int = 30522
    max_seq_len: int = 77
    use_tokenizer: bool = True
    embedding_dropout: float = 0.0
    # x-transformers' language-model head (n_embed x vocab_size): never used by the LDM, but
    # in every CompVis checkpoint. False leaves it out (a 64-wide encoder: 2.0 M parameters
    # instead of 4.0 M).
    logits_head: bool = True


@dataclass
class CLIPTextConfig:
    """`FrozenCLIPEmbedder` (Stable Diffusion v1): CLIP's BPE tokenizer + CLIP's text
    transformer (causal, quick-GELU); the defaults are ViT-L/14's, which SD v1 uses."""

    kind: Literal["clip"] = "clip"
    vocab_size: int = 49408
    max_seq_len: int = 77
    n_embed: int = 768  # width: the context's last dimension
    n_layer: int = 12
    n_head: int = 12
    use_tokenizer: bool = True


@dataclass
class DiffusionConfig:
    """`DDPM` / `LatentDiffusion` settings (CompVis names) plus conditioning dropout."""

    timesteps: int = 1000
    beta_schedule: Literal["linear", "cosine", "sqrt_linear", "sqrt"] = "linear"
    linear_start: float = 1e-4
    linear_end: float = 2e-2
    cosine_s: float = 8e-3
    given_betas: tuple[float, ...] | None = None
    loss_type: Literal["l1", "l2"] = "l2"
    parameterization: Literal["eps", "x0"] = "eps"
    v_posterior: float = 0.0
    l_simple_weight: float = 1.0
    original_elbo_weight: float = 0.0
    learn_logvar: bool = False
    logvar_init: float = 0.0
    clip_denoised: bool = True
    use_ema: bool = True
    image_size: int = 32
    channels: int = 4
    first_stage_key: str = "image"
    cond_stage_key: str = "caption"
    cond_stage_trainable: bool = True
    conditioning_key: Literal["crossattn"] | None = "crossattn"
    num_timesteps_cond: int = 1
    scale_factor: float = 1.0
    scale_by_std: bool = False
    # Fraction of captions replaced by "" in training, so classifier-free guidance works.
    cond_drop_prob: float = 0.1


@dataclass
class LDMConfig:
    """A whole text-to-image latent diffusion model."""

    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    first_stage: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    cond_stage: TextEncoderConfig | CLIPTextConfig = field(default_factory=TextEncoderConfig)

    @property
    def latent_size(self) -> int:
        """The side of the latents the model was trained on: LatentDiffusion's `image_size`
        (CompVis samples at it; the UNet's own `image_size` is unused there, and SD v1's
        config sets it to 32 beside 64)."""
        return self.diffusion.image_size


# --- generic dataclass <-> dict conversion with validation -------------------------------

def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _convert_union(value, get_args(tp), where)
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{where}: {value!r} is not one of {list(allowed)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item_tp, _ellipsis) = get_args(tp)
        return tuple(_convert(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def _convert_union(value: Any, args: tuple, where: str) -> Any:
    """`value` as the first of `args` that takes it (the one its `kind` names, if any)."""
    if value is None and type(None) in args:
        return None
    tagged = _tagged(args, value, where)
    if tagged is not None:  # `kind:` names the dataclass: its errors are the ones to show
        return _convert(value, tagged, where)
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _convert(value, arg, where)
        except ConfigError as e:
            errors.append(str(e))
    raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")


def _tagged(args: tuple, value: Any, where: str) -> type | None:
    """The dataclass among `args` whose `kind` default is `value["kind"]`, if any."""
    if not isinstance(value, dict) or "kind" not in value:
        return None
    kinds = {f.default: a for a in args if dataclasses.is_dataclass(a)
             for f in dataclasses.fields(a) if f.name == "kind"}
    if value["kind"] not in kinds:
        raise ConfigError(f"{where}.kind: {value['kind']!r} is not one of {list(kinds)}")
    return kinds[value["kind"]]


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad values."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(
            f"unknown config key {prefix}{unknown[0]} (allowed: {', '.join(sorted(names))})"
        )
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}" if where else key)
    return cls(**kwargs)


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain dict/list structure (YAML/JSON friendly)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(v) for v in obj]
    return obj


def load_yaml(cls: type, path: str | Path) -> Any:
    """Read a YAML file into dataclass `cls`."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    return from_dict(cls, data)


def apply_overrides(obj: Any, overrides: list[str]) -> Any:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a dataclass, validated."""
    data = to_dict(obj)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        node, node_cls = data, type(obj)
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"unknown config key {'.'.join(parts[: i + 1])}")
            node_cls = _dataclass_of(typing.get_type_hints(node_cls)[part])
            if node[part] is None and node_cls is not None:
                node[part] = to_dict(node_cls())  # an optional section switched on by an override
            node = node[part]
        if not isinstance(node, dict) or parts[-1] not in node:
            raise ConfigError(f"unknown config key {key}")
        node[parts[-1]] = yaml.safe_load(raw)
    return from_dict(type(obj), data)


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass inside `tp` (`X` or `X | None`), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    for arg in get_args(tp):
        if dataclasses.is_dataclass(arg):
            return arg
    return None
