"""The default largest batch follows the latent size: 8 up to 32x32, fewer above."""
from __future__ import annotations

import pytest
import yaml

from export.specs import ShapeLimits, auto_max_batch, build_specs
from ldm.compat import ldm_config

SD = "configs/compvis/v1-inference.yaml"


@pytest.mark.parametrize("latent, batch", [(8, 8), (32, 8), (48, 3), (64, 2), (128, 1)])
def test_auto_max_batch(latent, batch):
    assert auto_max_batch(latent) == batch


def test_sd_v1_exports_for_two_images_unless_told():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    cfg = ldm_config(yaml.safe_load((root / SD).read_text())["model"])
    specs = build_specs(cfg)
    assert specs["unet"].profile["batch"] == (1, 2, 4)  # guided: [uncond, cond] per image
    assert specs["unet"].profile["height"] == (64, 64, 64)  # 512 px, SD's latent side
    assert specs["vae_decoder"].profile["batch"] == (1, 1, 2)
    assert build_specs(cfg, ShapeLimits(max_batch=8))["unet"].profile["batch"] == (1, 2, 16)
