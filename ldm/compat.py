"""Load CompVis latent-diffusion models: their YAML config and `.ckpt` into our classes.

    model = load_compvis("txt2img-1p4B-eval.yaml", "model.ckpt")   # -> LatentDiffusion
    model = load_compvis("v1-inference.yaml", "sd-v1-4.ckpt")        # Stable Diffusion v1
    model = load_compvis(None, "runs/shapes_ldm/model")              # our own format too

CompVis YAML names classes by import path (`target:`) and passes `params:` to them. Here an
explicit table maps the supported targets to our typed configs; anything else is an error
that lists what is supported. Our modules keep CompVis's state-dict key names, so weights
load strictly: a missing or unexpected key is an error naming the keys.

A `.ckpt` is a pickle, which can run code when loaded. It is read with
`torch.load(weights_only=True)` (Lightning's own classes mapped to inert stand-ins, see
ldm/checkpoints.py); a file that needs more is refused unless the caller passes
`allow_pickle=True` (CLI: `--unsafe-allow-pickle`), to be used only for files you trust.
`.safetensors` files with CompVis keys load too. Files are memory-mapped and the model is
built without weights of its own, so loading costs about one copy of the weights, not two.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import yaml

from ldm.checkpoints import assign_state, empty_weights, read_checkpoint
from ldm.config import (
    AutoencoderConfig,
    CLIPTextConfig,
    ConfigError,
    DDConfig,
    DiffusionConfig,
    LDMConfig,
    LossConfig,
    TextEncoderConfig,
    UNetConfig,
    from_dict,
)

log = logging.getLogger(__name__)

LDM_TARGETS = ("ldm.models.diffusion.ddpm.LatentDiffusion",)
AUTOENCODER_TARGETS = ("ldm.models.autoencoder.AutoencoderKL",)
UNET_TARGETS = ("ldm.modules.diffusionmodules.openaimodel.UNetModel",)
BERT_TARGET = "ldm.modules.encoders.modules.BERTEmbedder"
CLIP_TARGET = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
TEXT_TARGETS = (BERT_TARGET, CLIP_TARGET)
# FrozenCLIPEmbedder(version=...): the Hugging Face model it downloads. Only ViT-L/14's text
# model (SD v1) is known here, offline.
CLIP_VERSIONS = ("openai/clip-vit-large-patch14",)
# A buffer older transformers saved in SD v1 files (0..76); newer ones recompute it.
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
LOSS_TARGETS = {
    "torch.nn.Identity": None,
    "ldm.modules.losses.LPIPSWithDiscriminator": LossConfig,
    "ldm.modules.losses.contperceptual.LPIPSWithDiscriminator": LossConfig,
}
# CompVis parameters that only steer Lightning training/logging or the original loader.
IGNORED_PARAMS = {
    "monitor", "log_every_t", "ckpt_path", "ignore_keys", "load_only_unet", "image_key",
    "scheduler_config", "use_positional_encodings", "concat_mode", "cond_stage_forward",
    "colorize_nlabels", "device", "learning_rate", "ckpt", "make_it_fit", "reset_ema",
    "reset_num_ema_updates",
}
UNET_IGNORED = {"use_checkpoint", "use_fp16"}


def _target(section: dict, where: str, allowed) -> str:
    target = section.get("target")
    if target not in allowed:
        raise ConfigError(
            f"{where}.target {target!r} is not supported (supported: {list(allowed)})")
    return target


def _params(section: dict, ignored: set[str] = frozenset()) -> dict:
    params = dict(section.get("params") or {})
    for key in list(params):
        if key in ignored:
            params.pop(key)
    return params


def autoencoder_config(section: dict, where: str = "first_stage_config") -> AutoencoderConfig:
    _target(section, where, AUTOENCODER_TARGETS)
    p = _params(section, IGNORED_PARAMS)
    loss = p.pop("lossconfig", {"target": "torch.nn.Identity"})
    loss_cls = LOSS_TARGETS.get(loss.get("target"), "?")
    if loss_cls == "?":
        raise ConfigError(f"{where}.params.lossconfig.target {loss.get('target')!r} is not "
                          f"supported (supported: {list(LOSS_TARGETS)})")
    lossconfig = None
    if loss_cls is not None:
        # CompVis's loss is LPIPS-VGG16; keep it, so the checkpoint's loss keys load.
        lossconfig = from_dict(LossConfig, {"perceptual_backbone": "vgg16", **_params(loss)},
                               f"{where}.params.lossconfig.params")
    return AutoencoderConfig(
        ddconfig=from_dict(DDConfig, p.pop("ddconfig"), f"{where}.params.ddconfig"),
        embed_dim=p.pop("embed_dim"),
        lossconfig=lossconfig,
        **_check_empty(p, f"{where}.params"),
    )


def _check_empty(rest: dict, where: str) -> dict:
    if rest:
        raise ConfigError(f"unknown config key {where}.{sorted(rest)[0]}")
    return {}


def ldm_config(model: dict) -> LDMConfig:
    """Map CompVis `model:` (LatentDiffusion) onto our LDMConfig."""
    _target(model, "model", LDM_TARGETS)
    p = _params(model, IGNORED_PARAMS)
    unet_sec, first_sec, cond_sec = (p.pop("unet_config"), p.pop("first_stage_config"),
                                     p.pop("cond_stage_config"))
    _target(unet_sec, "unet_config", UNET_TARGETS)
    unet = from_dict(UNetConfig, _params(unet_sec, UNET_IGNORED), "unet_config.params")
    if isinstance(cond_sec, str):
        raise ConfigError(f"cond_stage_config {cond_sec!r} is not supported (a text encoder is)")
    text = text_encoder_config(cond_sec)
    diffusion = from_dict(DiffusionConfig, p, "model.params")
    return LDMConfig(diffusion=diffusion, unet=unet, first_stage=autoencoder_config(first_sec),
                     cond_stage=text)


def text_encoder_config(section: dict) -> TextEncoderConfig | CLIPTextConfig:
    """CompVis `cond_stage_config` -> BERTEmbedder's or FrozenCLIPEmbedder's config."""
    where = "cond_stage_config.params"
    if _target(section, "cond_stage_config", TEXT_TARGETS) == BERT_TARGET:
        return from_dict(TextEncoderConfig, _params(section, {"device"}), where)
    p = _params(section, {"device", "freeze"})  # frozen either way: SD never trains it
    version = p.pop("version", CLIP_VERSIONS[0])
    if version not in CLIP_VERSIONS:
        raise ConfigError(f"{where}.version {version!r} is not supported (supported: "
                          f"{list(CLIP_VERSIONS)})")
    max_length = p.pop("max_length", 77)
    if max_length != 77:
        raise ConfigError(f"{where}.max_length {max_length!r}: CLIP's text model has 77 "
                          "positions")
    layer = p.pop("layer", "last")  # later CompVis code can pick another layer's states
    if layer != "last":
        raise ConfigError(f"{where}.layer {layer!r} is not supported (supported: ['last'])")
    # Not a CompVis key: our way to describe a CLIP text model of other sizes (the reduced
    # SD models of the tests); CompVis files never carry it and get ViT-L/14.
    architecture = p.pop("architecture", {})
    _check_empty(p, where)
    return from_dict(CLIPTextConfig, architecture, f"{where}.architecture")


def drop_recomputed_buffers(state: dict, checkpoint: str) -> dict:
    """Buffers some files carry that the model recomputes: `lvlb_weights` (from the schedule)
    and CLIP's `position_ids` (0..76), which old transformers saved and new ones do not."""
    ids = state.get(POSITION_IDS)
    if ids is not None and not torch.equal(ids.reshape(-1).double(),
                                           torch.arange(ids.numel(), dtype=torch.float64)):
        log.warning("%s: %s is not 0..%d (a damaged merge?); CLIP's own positions are used",
                    checkpoint, POSITION_IDS, ids.numel() - 1)
    return {k: v for k, v in state.items() if k not in ("lvlb_weights", POSITION_IDS)}


def load_compvis(
    config_yaml: str | Path | None, checkpoint: str | Path, allow_pickle: bool = False
) -> Any:
    """A CompVis config + checkpoint (or our checkpoint folder) -> model in eval mode.

    Returns a `LatentDiffusion` for LDM configs and an `AutoencoderKL` for autoencoder ones.
    """
    if Path(checkpoint).is_dir():
        from ldm.pretrained import load_pretrained

        return load_pretrained(checkpoint)
    if config_yaml is None:
        raise ConfigError("a CompVis checkpoint needs its YAML config")
    model_sec = (yaml.safe_load(Path(config_yaml).read_text()) or {}).get("model")
    if not isinstance(model_sec, dict):
        raise ConfigError(f"{config_yaml}: no `model:` section")
    state = read_checkpoint(checkpoint, allow_pickle)
    if model_sec.get("target") in AUTOENCODER_TARGETS:
        from ldm.models.autoencoder import AutoencoderKL

        cfg = autoencoder_config(model_sec, "model")
        with empty_weights():
            model = AutoencoderKL(cfg)
    else:
        from ldm.models.diffusion import LatentDiffusion

        cfg = ldm_config(model_sec)
        has_ema = any(k.startswith("model_ema.") for k in state)
        if has_ema != cfg.diffusion.use_ema:
            log.info("use_ema=%s to match the checkpoint's model_ema keys", has_ema)
            cfg.diffusion.use_ema = has_ema
        with empty_weights():  # the weights come from the (memory-mapped) file
            model = LatentDiffusion(cfg)
        state = drop_recomputed_buffers(state, str(checkpoint))
    assign_state(model, state, str(checkpoint))
    return model.eval()
