"""Stable Diffusion v1 files: CompVis's v1-inference.yaml, and every layout SD files come in."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from ldm.checkpoints import empty_weights
from ldm.compat import POSITION_IDS, ldm_config, load_compvis
from ldm.config import CLIPTextConfig, ConfigError
from ldm.models.diffusion import LatentDiffusion

ROOT = Path(__file__).resolve().parent.parent
SD_YAML = ROOT / "configs" / "compvis" / "v1-inference.yaml"
TINY_SD = Path(__file__).parent / "fixtures" / "compvis_tiny_sd.yaml"
PROMPTS = ["a photograph of an astronaut riding a horse", ""]


def tiny_sd(use_ema: bool, seed: int = 0) -> LatentDiffusion:
    cfg = ldm_config(yaml.safe_load(TINY_SD.read_text())["model"])
    cfg.diffusion.use_ema = use_ema
    torch.manual_seed(seed)
    model = LatentDiffusion(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        if use_ema:  # EMA weights unlike the training ones, so it shows which are used
            for buf in model.model_ema.buffers():
                if buf.is_floating_point() and buf.dim() > 0:
                    buf.normal_(0, 0.05)
    return model.eval()


def outputs(model: LatentDiffusion) -> tuple[torch.Tensor, torch.Tensor]:
    """(text context, UNet eps) for fixed inputs: what a layout must reproduce."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad(), model.ema_scope():  # the EMA weights, where the file has them
        c = model.get_learned_conditioning(PROMPTS)
        eps = model.apply_model(x, torch.tensor([10, 500]), c)
    return c, eps


def test_v1_inference_yaml_is_sd_v1():
    cfg = ldm_config(yaml.safe_load(SD_YAML.read_text())["model"])
    assert cfg.cond_stage == CLIPTextConfig()  # ViT-L/14: 12 layers, 768 wide, 12 heads
    assert (cfg.diffusion.image_size, cfg.diffusion.scale_factor) == (64, 0.18215)
    assert cfg.unet.context_dim == 768 and not cfg.diffusion.cond_stage_trainable
    with empty_weights():
        model = LatentDiffusion(cfg)
    count = [sum(p.numel() for p in m.parameters())
             for m in (model.model.diffusion_model, model.first_stage_model,
                       model.cond_stage_model)]
    assert count == [859_520_964, 83_653_863, 123_060_480]  # SD v1's published sizes


@pytest.mark.parametrize("layout", ["ckpt", "ckpt+position_ids", "ckpt+ema", "safetensors"])
def test_every_sd_layout_loads_strictly(tmp_path, layout):
    model = tiny_sd(use_ema=layout == "ckpt+ema")
    state = model.state_dict()
    if layout == "ckpt+position_ids":  # transformers < 4.31 saved this buffer
        state[POSITION_IDS] = torch.arange(77)[None]
    if layout == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "sd.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        path = tmp_path / "sd.ckpt"
        torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)
    loaded = load_compvis(TINY_SD, path)
    assert loaded.use_ema is (layout == "ckpt+ema")  # the file's EMA keys decide
    for got, want in zip(outputs(loaded), outputs(model), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_damaged_position_ids_buffer_is_named(tmp_path, caplog):
    state = tiny_sd(use_ema=False).state_dict()
    # Merges that averaged it in float left 0.9999...; cast to int64 that is position 0.
    state[POSITION_IDS] = torch.arange(77)[None].float() * 0.9999
    torch.save({"state_dict": state}, tmp_path / "sd.ckpt")
    with caplog.at_level(logging.WARNING):
        load_compvis(TINY_SD, tmp_path / "sd.ckpt")
    assert "position_ids is not 0..76" in caplog.text


def test_missing_clip_keys_are_named(tmp_path):
    state = tiny_sd(use_ema=False).state_dict()
    del state["cond_stage_model.transformer.text_model.final_layer_norm.weight"]
    torch.save({"state_dict": state}, tmp_path / "sd.ckpt")
    with pytest.raises(Exception, match="final_layer_norm.weight"):
        load_compvis(TINY_SD, tmp_path / "sd.ckpt")


@pytest.mark.parametrize("params, message", [
    ({"version": "openai/clip-vit-base-patch32"}, "version 'openai/clip-vit-base-patch32' is"),
    ({"max_length": 128}, "max_length 128: CLIP's text model has 77 positions"),
    ({"layer": "penultimate"}, "layer 'penultimate' is not supported"),
    ({"foo": 1}, "unknown config key cond_stage_config.params.foo"),
])
def test_unsupported_frozen_clip_params_are_named(params, message):
    model = yaml.safe_load(SD_YAML.read_text())["model"]
    model["params"]["cond_stage_config"]["params"] = params
    with pytest.raises(ConfigError, match=message):
        ldm_config(model)
