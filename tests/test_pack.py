"""`python -m ldm.pack`: EMA weights served, EMA copy dropped, fp16 storage, decoder swap."""
import dataclasses

import pytest
import torch

from ldm.models.autoencoder import AutoencoderKL
from ldm.pack import main
from ldm.pretrained import load_pretrained, save_pretrained
from tests.conftest import make_tiny_ldm


@pytest.fixture()
def trained(tmp_path):
    model = make_tiny_ldm()
    with torch.no_grad():  # make the EMA differ from the raw weights
        for name, buf in model.model_ema.named_buffers():
            if name not in ("decay", "num_updates"):
                buf.add_(0.01)
    save_pretrained(tmp_path / "ldm", model, "ldm", model.config)
    return model, tmp_path


def test_pack_serves_ema_weights_in_fp16(trained):
    model, tmp = trained
    assert main(["--ldm", str(tmp / "ldm"), "--out", str(tmp / "out"), "--dtype", "float16"]) == 0
    packed = load_pretrained(tmp / "out" / "ldm")
    assert packed.model_ema is None and not packed.config.diffusion.use_ema
    ema = model.model_ema
    for name, p in packed.model.named_parameters():
        want = getattr(ema, ema.m_name2s_name[name]).half().float()
        assert torch.equal(p, want), name
    raw = (tmp / "out" / "ldm" / "model.safetensors").stat().st_size
    assert raw < 0.6 * (tmp / "ldm" / "model.safetensors").stat().st_size  # fp16, no EMA copy
    ae = load_pretrained(tmp / "out" / "autoencoder")
    for k, v in ae.state_dict().items():
        assert torch.equal(v, packed.first_stage_model.state_dict()[k])


def test_decoder_swap_requires_the_same_encoder(trained):
    model, tmp = trained
    cfg = model.config.first_stage
    ae = AutoencoderKL(cfg)
    ae.load_state_dict(model.first_stage_model.state_dict())
    with torch.no_grad():
        ae.decoder.conv_out.bias.add_(1.0)
    save_pretrained(tmp / "ae_ft", ae, "autoencoder", cfg)
    assert main(["--ldm", str(tmp / "ldm"), "--first-stage", str(tmp / "ae_ft"),
                 "--out", str(tmp / "out")]) == 0
    packed = load_pretrained(tmp / "out" / "ldm")
    assert torch.equal(packed.first_stage_model.decoder.conv_out.bias, ae.decoder.conv_out.bias)
    with torch.no_grad():
        ae.encoder.conv_in.bias.add_(1.0)
    save_pretrained(tmp / "ae_bad", ae, "autoencoder", dataclasses.replace(cfg))
    assert main(["--ldm", str(tmp / "ldm"), "--first-stage", str(tmp / "ae_bad"),
                 "--out", str(tmp / "out2")]) == 2


def test_the_autoencoder_copy_can_be_left_out(trained):
    _, tmp = trained
    assert main(["--ldm", str(tmp / "ldm"), "--out", str(tmp / "slim"), "--no-autoencoder"]) == 0
    assert [p.name for p in (tmp / "slim").iterdir()] == ["ldm"]


def test_sampling_defaults_are_recorded_and_checked(trained, capsys):
    from ldm.pretrained import read_sampling

    _, tmp = trained
    assert read_sampling(tmp / "ldm") == {}  # none recorded
    assert main(["--ldm", str(tmp / "ldm"), "--out", str(tmp / "out"), "--default-steps", "10",
                 "--default-guidance-scale", "3", "--default-sampler", "plms"]) == 0
    assert read_sampling(tmp / "out" / "ldm") == {"steps": 10, "guidance_scale": 3.0,
                                                  "sampler": "plms"}
    load_pretrained(tmp / "out" / "ldm")  # the model still loads strictly
    for flag, value, says in [("--default-steps", "0", "steps must be an integer >= 1, got 0"),
                              ("--default-guidance-scale", "nan", "got nan"),
                              ("--default-sampler", "euler", "sampler 'euler' is not one of")]:
        assert main(["--ldm", str(tmp / "ldm"), "--out", str(tmp / "bad"), flag, value]) == 2
        assert says in capsys.readouterr().err
        assert not (tmp / "bad").exists()  # refused before writing


def test_a_hand_edited_sampling_section_is_refused_by_name(trained):
    import yaml

    from ldm.config import ConfigError
    from ldm.pretrained import read_sampling

    _, tmp = trained
    path = tmp / "ldm" / "config.yaml"
    header = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**header, "sampling": {"guidance": 3}}))
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['guidance'\]"):
        read_sampling(tmp / "ldm")
