"""CompVis checkpoint loading: strict keys, the Lightning `.ckpt` layout, pickle refusal."""
import collections
from pathlib import Path

import pytest
import torch

from ldm.compat import load_compvis, read_checkpoint
from ldm.config import ConfigError
from ldm.pretrained import load_pretrained, save_pretrained

CONFIG = Path(__file__).parent / "fixtures" / "compvis_tiny_txt2img.yaml"
# What CompVis DDPM.register_schedule registers (persistent), in its order.
SCHEDULE_BUFFERS = [
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
]


@pytest.fixture(scope="module")
def compvis_state():
    """A state dict laid out as CompVis's LatentDiffusion saves it, with random weights."""
    model = load_compvis(CONFIG, _write_ckpt_once())
    return {k: v.clone() for k, v in model.state_dict().items()}


_CACHE: dict = {}


def _write_ckpt_once() -> Path:
    if "path" not in _CACHE:
        import tempfile

        import yaml

        from ldm.compat import ldm_config
        from ldm.models.diffusion import LatentDiffusion

        cfg = ldm_config(yaml.safe_load(CONFIG.read_text())["model"])
        model = LatentDiffusion(cfg)
        for p in model.parameters():
            p.data.normal_(0, 0.05)
        path = Path(tempfile.mkdtemp()) / "model.ckpt"
        # Lightning layout: the weights under "state_dict" next to training metadata.
        torch.save({"state_dict": model.state_dict(), "global_step": 7, "epoch": 1}, path)
        _CACHE["path"], _CACHE["state"] = path, model.state_dict()
    return _CACHE["path"]


def test_config_maps_every_compvis_param():
    import yaml

    from ldm.compat import ldm_config

    cfg = ldm_config(yaml.safe_load(CONFIG.read_text())["model"])
    assert cfg.diffusion.linear_start == 0.00085 and cfg.diffusion.scale_factor == 0.18215
    assert cfg.unet.context_dim == 32 and cfg.unet.legacy is False
    assert cfg.first_stage.ddconfig.ch_mult == (1, 2, 2) and cfg.first_stage.lossconfig is None
    assert cfg.cond_stage.n_embed == 32 and cfg.cond_stage.n_layer == 2


def test_top_level_key_groups_are_compvis():
    path = _write_ckpt_once()
    state = read_checkpoint(path)
    groups = collections.Counter(k.split(".")[0] for k in state)
    assert set(groups) == {"model", "first_stage_model", "cond_stage_model", *SCHEDULE_BUFFERS}
    assert all(k.startswith("model.diffusion_model.") for k in state if k.startswith("model."))
    assert "lvlb_weights" not in state  # non-persistent in CompVis
    assert "cond_stage_model.transformer.token_emb.weight" in state
    assert "first_stage_model.post_quant_conv.weight" in state


def test_strict_load_reproduces_weights_and_outputs():
    path = _write_ckpt_once()
    model = load_compvis(CONFIG, path)
    for k, v in _CACHE["state"].items():
        assert torch.equal(model.state_dict()[k], v), k
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([10, 500])
    c = torch.randn(2, 77, 32)
    again = load_compvis(CONFIG, path)
    torch.testing.assert_close(model.apply_model(x, t, c), again.apply_model(x, t, c))


def test_ema_keys_are_loaded_when_present(tmp_path):
    import yaml

    from ldm.compat import ldm_config
    from ldm.models.diffusion import LatentDiffusion

    cfg = ldm_config(yaml.safe_load(CONFIG.read_text())["model"])
    cfg.diffusion.use_ema = True
    model = LatentDiffusion(cfg)
    state = model.state_dict()
    assert "model_ema.decay" in state and "model_ema.num_updates" in state
    assert "model_ema.diffusion_modeltime_embed0weight" in state
    torch.save({"state_dict": state}, tmp_path / "ema.ckpt")
    loaded = load_compvis(CONFIG, tmp_path / "ema.ckpt")  # the YAML says use_ema: False
    assert loaded.model_ema is not None


def test_missing_and_unexpected_keys_are_named(tmp_path):
    state = dict(_CACHE.get("state") or read_checkpoint(_write_ckpt_once()))
    state.pop("first_stage_model.quant_conv.bias")
    state["cond_stage_model.extra.weight"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "bad.ckpt")
    with pytest.raises(KeyError, match="quant_conv.bias.*extra.weight"):
        load_compvis(CONFIG, tmp_path / "bad.ckpt")


class _Evil:
    def __reduce__(self):
        return (print, ("this would run code",))


def test_pickle_with_code_is_refused_unless_allowed(tmp_path):
    state = read_checkpoint(_write_ckpt_once())
    torch.save({"state_dict": state, "callbacks": _Evil()}, tmp_path / "pickled.ckpt")
    with pytest.raises(ValueError, match="allow_pickle=True"):
        load_compvis(CONFIG, tmp_path / "pickled.ckpt")
    model = load_compvis(CONFIG, tmp_path / "pickled.ckpt", allow_pickle=True)
    assert model.num_timesteps == 1000


def test_unsupported_target_lists_supported(tmp_path):
    text = CONFIG.read_text().replace(
        "ldm.modules.encoders.modules.BERTEmbedder",
        "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder")  # SD 2's
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ConfigError,
                       match="FrozenOpenCLIPEmbedder.*BERTEmbedder.*FrozenCLIPEmbedder"):
        load_compvis(tmp_path / "c.yaml", _write_ckpt_once())


def test_our_format_roundtrip(tmp_path):
    model = load_compvis(CONFIG, _write_ckpt_once())
    save_pretrained(tmp_path / "ours", model, "ldm", model.config)
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["config.yaml",
                                                                     "model.safetensors"]
    back = load_compvis(None, tmp_path / "ours")
    assert back.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert isinstance(load_pretrained(tmp_path / "ours"), type(model))
