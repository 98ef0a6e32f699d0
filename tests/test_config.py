import pytest

from ldm.config import (
    AutoencoderConfig,
    ConfigError,
    DiffusionConfig,
    LDMConfig,
    LossConfig,
    apply_overrides,
    from_dict,
    load_yaml,
    to_dict,
)


def test_nested_yaml_roundtrip(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text(
        "diffusion: {timesteps: 10, beta_schedule: cosine}\n"
        "unet: {model_channels: 32, channel_mult: [1, 2], attention_resolutions: [1]}\n"
        "first_stage: {embed_dim: 3, ddconfig: {ch: 32, ch_mult: [1, 2]}}\n"
    )
    cfg = load_yaml(LDMConfig, path)
    assert cfg.diffusion.timesteps == 10
    assert cfg.diffusion.beta_schedule == "cosine"
    assert cfg.unet.channel_mult == (1, 2)
    assert cfg.first_stage.ddconfig.ch_mult == (1, 2)
    assert cfg.first_stage.lossconfig is None
    assert from_dict(LDMConfig, to_dict(cfg)) == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="unknown config key unet.model_chanels"):
        from_dict(LDMConfig, {"unet": {"model_chanels": 3}})


def test_bad_enum_lists_allowed_values():
    with pytest.raises(ConfigError, match=r"beta_schedule: 'quadratic' is not one of"):
        from_dict(DiffusionConfig, {"beta_schedule": "quadratic"})


def test_bad_type_is_named():
    with pytest.raises(ConfigError, match="timesteps: expected an integer"):
        from_dict(DiffusionConfig, {"timesteps": "many"})


def test_overrides_parse_yaml_values_and_validate():
    cfg = apply_overrides(LDMConfig(), ["unet.channel_mult=[1,2,3]", "diffusion.linear_end=0.012"])
    assert cfg.unet.channel_mult == (1, 2, 3)
    assert cfg.diffusion.linear_end == pytest.approx(0.012)
    with pytest.raises(ConfigError, match="unknown config key unet.nope"):
        apply_overrides(LDMConfig(), ["unet.nope=1"])
    with pytest.raises(ConfigError, match="not of the form"):
        apply_overrides(LDMConfig(), ["unet.channel_mult"])


def test_optional_nested_dataclass_can_be_overridden():
    cfg = apply_overrides(AutoencoderConfig(), ["lossconfig.disc_start=5"])
    assert isinstance(cfg.lossconfig, LossConfig)
    assert cfg.lossconfig.disc_start == 5
