"""LatentDiffusion: CompVis's state-dict layout, frozen stages, conditioning and training step.

Every expected value here is computed independently in the test (the autoencoder, text encoder
or UNet called directly), never read back from the code under test.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm.config import LDMConfig
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion import LatentDiffusion
from ldm.modules.text_encoder import BERTEmbedder
from ldm.modules.unet import UNetModel
from tests.models.diffusion_helpers import SCHEDULE_BUFFERS, randomize_, tiny_ldm


def compvis_ldm_keys(cfg: LDMConfig) -> list[str]:
    """The state-dict keys CompVis's LatentDiffusion produces, by its construction rules:
    logvar (only when learned), the schedule buffers, scale_factor (only with scale_by_std),
    then model.diffusion_model.*, model_ema.{decay,num_updates,<param name without dots>},
    first_stage_model.*, cond_stage_model.*."""
    d = cfg.diffusion
    unet = [f"diffusion_model.{k}" for k in UNetModel(cfg.unet).state_dict()]
    unet_params = [f"diffusion_model.{k}" for k, _ in UNetModel(cfg.unet).named_parameters()]
    keys = ["logvar"] if d.learn_logvar else []
    keys += SCHEDULE_BUFFERS + (["scale_factor"] if d.scale_by_std else [])
    keys += [f"model.{k}" for k in unet]
    if d.use_ema:
        keys += ["model_ema.decay", "model_ema.num_updates"]
        keys += [f"model_ema.{k.replace('.', '')}" for k in unet_params]
    keys += [f"first_stage_model.{k}" for k in AutoencoderKL(cfg.first_stage).state_dict()]
    keys += [f"cond_stage_model.{k}" for k in BERTEmbedder(cfg.cond_stage).state_dict()]
    return keys


@pytest.mark.parametrize(
    "options", [{}, {"scale_by_std": True, "learn_logvar": True}, {"use_ema": False}]
)
def test_ldm_state_dict_keys_follow_compvis(options: dict) -> None:
    cfg = tiny_ldm(**options)
    sd = LatentDiffusion(cfg).state_dict()
    assert list(sd) == compvis_ldm_keys(cfg)
    groups = list(dict.fromkeys(k.split(".")[0] for k in sd if "." in k))
    expected_groups = ["model", "model_ema", "first_stage_model", "cond_stage_model"]
    if options.get("use_ema") is False:
        expected_groups.remove("model_ema")
    assert groups == expected_groups
    shapes = {
        "model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (32, 32),
        "model.diffusion_model.out.2.weight": (4, 32, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.post_quant_conv.weight": (4, 4, 1, 1),
        "cond_stage_model.transformer.token_emb.weight": (30522, 32),
        "betas": (1000,),
    }
    for key, shape in shapes.items():
        assert tuple(sd[key].shape) == shape, key
    if options.get("use_ema", True):
        assert sd["model_ema.diffusion_modelinput_blocks00weight"].shape == (32, 4, 3, 3)
        assert sd["model_ema.num_updates"].dtype == torch.int32
    if options.get("scale_by_std"):
        assert sd["scale_factor"].shape == () and sd["scale_factor"].item() == 1.0


def test_ldm_stages_frozen_and_trainable() -> None:
    m = LatentDiffusion(tiny_ldm(cond_stage_trainable=True)).train()
    assert not m.first_stage_model.training
    assert not any(p.requires_grad for p in m.first_stage_model.parameters())
    assert m.cond_stage_model.training
    assert all(p.requires_grad for p in m.cond_stage_model.parameters())
    assert m.clip_denoised is False and isinstance(m.scale_factor, float)

    frozen = LatentDiffusion(tiny_ldm(cond_stage_trainable=False)).train()
    assert not frozen.cond_stage_model.training
    assert not any(p.requires_grad for p in frozen.cond_stage_model.parameters())


def test_apply_model_accepts_tensor_list_and_dict_conditioning() -> None:
    m = LatentDiffusion(tiny_ldm())
    randomize_(m.model)
    x, t, c = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.randn(2, 77, 32)
    with torch.no_grad():
        direct = m.model.diffusion_model(x, t, context=c)
        for cond in (c, [c], {"c_crossattn": [c]}):
            torch.testing.assert_close(m.apply_model(x, t, cond), direct)
        # A list of contexts is joined along the token axis.
        joined = m.model.diffusion_model(x, t, context=torch.cat([c, c[:, :5]], 1))
        torch.testing.assert_close(m.apply_model(x, t, [c, c[:, :5]]), joined)


def test_first_stage_encoding_scaling_and_decoding() -> None:
    m = LatentDiffusion(tiny_ldm(scale_factor=0.5))
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = m.first_stage_model.encode(x)
    eps = torch.randn(posterior.mean.shape, generator=torch.Generator().manual_seed(3))
    z = m.get_first_stage_encoding(m.encode_first_stage(x), torch.Generator().manual_seed(3))
    torch.testing.assert_close(z, 0.5 * (posterior.mean + posterior.std * eps))
    assert z.shape == (2, 4, 16, 16)
    torch.testing.assert_close(m.decode_first_stage(z), m.first_stage_model.decode(z / 0.5))
    # A tensor passes through, only scaled.
    scaled = m.get_first_stage_encoding(torch.ones(1, 4, 2, 2))
    torch.testing.assert_close(scaled, torch.full((1, 4, 2, 2), 0.5))


def test_set_scale_factor_from_batch_is_one_over_latent_std() -> None:
    m = LatentDiffusion(tiny_ldm(scale_by_std=True))
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    posterior = m.first_stage_model.encode(x)
    z = posterior.sample(generator=torch.Generator().manual_seed(5))
    expected = 1.0 / z.flatten().std()
    value = m.set_scale_factor_from_batch(x, generator=torch.Generator().manual_seed(5))
    assert value == pytest.approx(expected.item(), rel=1e-6)
    assert isinstance(m.scale_factor, torch.Tensor) and "scale_factor" in m.state_dict()
    assert m.state_dict()["scale_factor"].item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError):
        m.set_scale_factor_from_batch(x)  # only once, from 1.0
    with pytest.raises(ValueError, match="scale_by_std"):
        LatentDiffusion(tiny_ldm()).set_scale_factor_from_batch(x)


def test_text_conditioning_paths() -> None:
    m = LatentDiffusion(tiny_ldm())
    c = m.get_learned_conditioning(["a red circle", ""])
    assert c.shape == (2, 77, 32) and c.requires_grad
    ids = m.cond_stage_model.tokenize(["a red circle", ""])[0]
    from_ids = m.encode_text_tokens(ids)
    assert not from_ids.requires_grad
    torch.testing.assert_close(from_ids, c.detach())


def test_caption_dropout_fraction_and_determinism() -> None:
    m = LatentDiffusion(tiny_ldm(cond_drop_prob=0.1))
    captions = [f"caption {i}" for i in range(20_000)]
    dropped = m.drop_captions(captions, torch.Generator().manual_seed(0))
    n_empty = sum(c == "" for c in dropped)
    # Binomial(20000, 0.1): mean 2000, std ~42.
    assert abs(n_empty - 2000) < 5 * math.sqrt(20_000 * 0.1 * 0.9)
    assert all(d in ("", c) for c, d in zip(captions, dropped, strict=True))
    assert dropped == m.drop_captions(captions, torch.Generator().manual_seed(0))
    assert dropped != m.drop_captions(captions, torch.Generator().manual_seed(1))
    assert m.drop_captions(captions[:10]) != [] and len(m.drop_captions(captions[:10])) == 10
    m.cond_drop_prob = 0.0
    assert m.drop_captions(captions[:50], torch.Generator().manual_seed(0)) == captions[:50]
    m.cond_drop_prob = 1.0
    assert m.drop_captions(captions[:50], torch.Generator().manual_seed(0)) == [""] * 50


def test_forward_is_deterministic_and_uses_dropout_in_training() -> None:
    m = LatentDiffusion(tiny_ldm(cond_drop_prob=1.0, timesteps=100)).train()
    randomize_(m.model, std=0.3)  # large enough weights that the context visibly matters
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    seed = torch.Generator().manual_seed
    loss_a, logs = m(x, ["a red circle", "a blue square"], seed(0))
    assert set(logs) == {"train/loss_simple", "train/loss_vlb", "train/loss"}
    assert loss_a.requires_grad
    # Every caption is dropped: other captions give the same loss, another seed does not.
    loss_b, _ = m(x, ["a green star", "a yellow moon"], seed(0))
    torch.testing.assert_close(loss_a, loss_b)
    assert not torch.allclose(loss_a, m(x, ["a red circle", "a blue square"], seed(1))[0])
    loss_a.backward()
    assert m.model.diffusion_model.out[2].weight.grad is not None
    assert all(p.grad is None for p in m.first_stage_model.parameters())

    # Without dropout (and in eval mode) the captions matter.
    m.cond_drop_prob = 0.0
    m.eval()
    with torch.no_grad():
        loss_c, logs = m(x, ["a red circle", "a blue square"], seed(0))
        loss_d, _ = m(x, ["a green star", "a yellow moon"], seed(0))
    assert set(logs) == {"val/loss_simple", "val/loss_vlb", "val/loss"}
    assert not torch.allclose(loss_c, loss_d)
    batch = {"image": x, "caption": ["a red circle", "a blue square"]}
    with torch.no_grad():
        torch.testing.assert_close(m.shared_step(batch, seed(0))[0], loss_c)
