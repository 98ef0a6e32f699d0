"""The sampler registry and the signature every sampler shares."""
import pytest
import torch

from ldm.samplers import (
    SAMPLERS,
    cfg_denoiser,
    get_sampler,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_plms,
)


def test_registry_names():
    assert SAMPLERS == {
        "ddim": sample_ddim,
        "plms": sample_plms,
        "dpmpp_2m": sample_dpmpp_2m,
        "ddpm": sample_ddpm,
    }
    assert get_sampler("dpmpp_2m") is sample_dpmpp_2m


def test_unknown_name_lists_allowed():
    with pytest.raises(ValueError) as err:
        get_sampler("euler_a")
    msg = str(err.value)
    assert "euler_a" in msg
    for name in ("ddim", "plms", "dpmpp_2m", "ddpm"):
        assert name in msg


@pytest.mark.parametrize("name", ["ddim", "plms", "dpmpp_2m", "ddpm"])
def test_shared_signature(name, model_alphas_cumprod):
    cond, uncond = torch.randn(2, 3, 4), torch.zeros(1, 3, 4)

    def unet(x, t, c):
        return torch.tanh(x) * 0.5 + c.mean((1, 2))[:, None, None, None]

    eps_fn = cfg_denoiser(unet, cond, uncond, guidance_scale=3.0)
    x_T = torch.randn(2, 4, 8, 8)
    steps_seen = []
    state = torch.get_rng_state()
    out = get_sampler(name)(
        eps_fn, x_T, model_alphas_cumprod, 10,
        generator=torch.Generator().manual_seed(0),
        callback=lambda i, n, x, x0: steps_seen.append((i, n, x.shape, x0.shape)),
    )
    assert torch.equal(torch.get_rng_state(), state)
    assert out.shape == x_T.shape and out.dtype == x_T.dtype and torch.isfinite(out).all()
    assert steps_seen == [(i, 10, x_T.shape, x_T.shape) for i in range(10)]
