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


def test_the_text_encoder_kind_picks_its_config():
    from ldm.config import CLIPTextConfig, TextEncoderConfig

    bert = from_dict(LDMConfig, {"cond_stage": {"n_embed": 32}}).cond_stage
    assert isinstance(bert, TextEncoderConfig) and bert.kind == "bert"  # configs before kind
    clip = from_dict(LDMConfig, {"cond_stage": {"kind": "clip", "n_head": 4}}).cond_stage
    assert isinstance(clip, CLIPTextConfig) and (clip.n_head, clip.n_embed) == (4, 768)
    # The kind decides whose error is shown: n_layer is CLIP's, n_heads is no one's.
    with pytest.raises(ConfigError, match=r"unknown config key cond_stage.n_heads \(allowed: "
                                          r"kind, max_seq_len, n_embed, n_head"):
        from_dict(LDMConfig, {"cond_stage": {"kind": "clip", "n_heads": 4}})
    with pytest.raises(ConfigError,
                       match=r"cond_stage.kind: 't5' is not one of \['bert', 'clip'\]"):
        from_dict(LDMConfig, {"cond_stage": {"kind": "t5"}})
    assert from_dict(LDMConfig, to_dict(LDMConfig(cond_stage=clip))).cond_stage == clip


def test_a_clip_model_round_trips_through_our_format(tmp_path):
    import torch

    from ldm.config import CLIPTextConfig
    from ldm.models.diffusion import LatentDiffusion
    from ldm.pretrained import load_pretrained, save_pretrained

    cfg = LDMConfig(cond_stage=CLIPTextConfig(n_embed=32, n_layer=1, n_head=2))
    cfg.unet.context_dim, cfg.unet.model_channels, cfg.unet.channel_mult = 32, 32, (1, 2)
    cfg.unet.use_spatial_transformer = True
    cfg.unet.attention_resolutions, cfg.unet.num_res_blocks, cfg.unet.num_heads = (1,), 1, 2
    cfg.first_stage.ddconfig.ch, cfg.first_stage.ddconfig.ch_mult = 32, (1, 2)
    model = LatentDiffusion(cfg).eval()
    save_pretrained(tmp_path / "m", model, "ldm", cfg)
    again = load_pretrained(tmp_path / "m")
    assert again.config.cond_stage == cfg.cond_stage
    with torch.no_grad():
        torch.testing.assert_close(again.get_learned_conditioning(["a fox"]),
                                   model.get_learned_conditioning(["a fox"]))


def test_autoencoder_widths_must_suit_groupnorm():
    from ldm.config import AutoencoderConfig, ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"ddconfig.ch=48 with ch_mult=\[1, 2\] gives 48 "
                                          r"channels; every width must be a multiple of 32"):
        from_dict(AutoencoderConfig, {"ddconfig": {"ch": 48, "ch_mult": [1, 2]}})
    assert from_dict(AutoencoderConfig, {"ddconfig": {"ch": 32, "ch_mult": [1, 3]}})
