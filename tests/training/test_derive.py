"""Configs derive sizes from the data and the first stage, and refuse contradictions."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from ldm.config import AutoencoderConfig, ConfigError, from_dict
from ldm.pretrained import save_pretrained
from ldm.train import main
from ldm.training.config import LDMTrainConfig
from ldm.training.derive import given_keys, ldm_sizes

FIX = Path(__file__).parents[1] / "fixtures"
AE, LDM = str(FIX / "tiny_train_ae.yaml"), str(FIX / "tiny_train_ldm.yaml")


@pytest.fixture(scope="module")
def first_stage(tmp_path_factory) -> Path:
    from ldm.models.autoencoder import AutoencoderKL

    cfg = from_dict(AutoencoderConfig, {"embed_dim": 3, "ddconfig": {
        "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "resolution": 16}})
    folder = tmp_path_factory.mktemp("ae") / "model"
    save_pretrained(folder, AutoencoderKL(cfg), "autoencoder", cfg)
    return folder


def test_given_keys_are_the_files_and_the_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  unet: {image_size: 8}\ndata: {size: 32}\n")
    assert given_keys(path, ["train.max_steps=3"]) == {"model.unet.image_size", "data.size",
                                                        "train.max_steps"}


def test_the_latent_size_and_channels_follow_data_size_and_the_first_stage(first_stage):
    cfg = LDMTrainConfig()
    cfg.model.first_stage = from_dict(AutoencoderConfig, {"embed_dim": 3, "ddconfig": {
        "ch_mult": [1, 2, 2]}})
    cfg.data.size = 64
    out = ldm_sizes(cfg, set())
    assert (out.model.diffusion.image_size, out.model.unet.image_size) == (16, 16)
    assert (out.model.diffusion.channels, out.model.unet.in_channels,
            out.model.unet.out_channels) == (3, 3, 3)
    with pytest.raises(ConfigError, match=r"model.unet.image_size=32 contradicts data.size=64 / "
                                          r"f=4 with 3 latent channels: it must be 16"):
        ldm_sizes(cfg, {"model.unet.image_size"})
    cfg.data.size = 66
    with pytest.raises(ConfigError, match="data.size=66 is not a multiple of"):
        ldm_sizes(cfg, set())


def test_training_derives_them_end_to_end(tmp_path, first_stage, caplog):
    out = tmp_path / "run"
    # The fixture sets an 8x8 latent for 16 px at f=2; this first stage has f=4 and 3
    # channels: a file that sets them contradicts it, so give a config that leaves them out.
    caplog.set_level(logging.INFO, logger="ldm")  # bench mains quiet "ldm" in-process
    cfg = tmp_path / "ldm.yaml"
    data = yaml.safe_load(Path(LDM).read_text())
    for key in ("image_size", "channels"):
        data["model"]["diffusion"].pop(key)
    for key in ("image_size", "in_channels", "out_channels"):
        data["model"]["unet"].pop(key)
    cfg.write_text(yaml.safe_dump(data))
    assert main(["ldm", "--config", str(cfg), f"first_stage={first_stage}",
                 f"train.out_dir={out}", "train.max_steps=2"]) == 0
    saved = json.loads((out / "config.json").read_text())["model"]
    assert saved["diffusion"]["image_size"] == saved["unet"]["image_size"] == 4
    assert saved["unet"]["in_channels"] == saved["diffusion"]["channels"] == 3
    assert "model.diffusion.image_size = 4 (derived: data.size=16 / f=4" in caplog.text
    # The fixture itself says 8x8 and 4 channels: with this first stage that is an error.
    assert main(["ldm", "--config", LDM, f"first_stage={first_stage}",
                 f"train.out_dir={tmp_path / 'bad'}"]) == 2


def test_autoencoder_resolution_follows_data_size(tmp_path, capsys):
    out = tmp_path / "ae"
    assert main(["autoencoder", "--config", AE, f"train.out_dir={out}", "train.max_steps=1",
                 "data.size=32", "model.ddconfig.resolution=16"]) == 2
    assert ("model.ddconfig.resolution=16 contradicts data.size=32: it must be 32"
            in capsys.readouterr().err)
