"""Classifier-free guidance wrapper: one batched UNet call, CompVis order, x0 -> eps."""
import pytest
import torch

from ldm.samplers import cfg_denoiser, x0_to_eps

B, C, H, W, L, D = 3, 2, 4, 4, 6, 5


class RecordingUNet:
    """Deterministic UNet stand-in that depends on x, t and context, and records its calls."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.wc = torch.randn(D, C, generator=g)
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def __call__(self, x, t, context):
        self.calls.append((x, t, context))
        out = torch.sin(x) * (1 + t[:, None, None, None].float() / 100)
        if context is not None:
            out = out + (context.sum(1) @ self.wc)[:, :, None, None]
        return out


def _inputs():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, C, H, W, generator=g)
    t = torch.tensor([10, 500, 999])
    cond = torch.randn(B, L, D, generator=g)
    uncond = torch.randn(1, L, D, generator=g)
    return x, t, cond, uncond


def test_guidance_is_one_batched_call_in_compvis_order():
    x, t, cond, uncond = _inputs()
    unet = RecordingUNet()
    eps = cfg_denoiser(unet, cond, uncond, guidance_scale=7.5)(x, t)

    assert len(unet.calls) == 1
    x_in, t_in, c_in = unet.calls[0]
    assert x_in.shape[0] == t_in.shape[0] == c_in.shape[0] == 2 * B
    assert torch.equal(x_in, torch.cat([x, x])) and torch.equal(t_in, torch.cat([t, t]))
    # CompVis: c_in = cat([unconditional_conditioning, c]); uncond (1, L, D) broadcast to B.
    assert torch.equal(c_in[:B], uncond.expand(B, L, D)) and torch.equal(c_in[B:], cond)

    ref = RecordingUNet()
    eps_u, eps_c = ref(x, t, uncond.expand(B, L, D)), ref(x, t, cond)
    torch.testing.assert_close(eps, eps_u + 7.5 * (eps_c - eps_u), rtol=1e-6, atol=1e-6)


def test_negative_prompt_per_sample():
    x, t, cond, _ = _inputs()
    negative = torch.randn(B, L, D)
    unet = RecordingUNet()
    eps = cfg_denoiser(unet, cond, negative, guidance_scale=3.0)(x, t)
    ref = RecordingUNet()
    eps_u, eps_c = ref(x, t, negative), ref(x, t, cond)
    torch.testing.assert_close(eps, eps_u + 3.0 * (eps_c - eps_u), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale, use_uncond", [(1.0, True), (5.0, False)])
def test_no_guidance_is_one_conditional_call(scale, use_uncond):
    x, t, cond, uncond = _inputs()
    unet = RecordingUNet()
    eps = cfg_denoiser(unet, cond, uncond if use_uncond else None, scale)(x, t)
    assert len(unet.calls) == 1
    x_in, t_in, c_in = unet.calls[0]
    assert x_in.shape[0] == B and torch.equal(c_in, cond)
    torch.testing.assert_close(eps, RecordingUNet()(x, t, cond))


def test_cond_broadcast_and_unconditional_model():
    x, t, cond, _ = _inputs()
    unet = RecordingUNet()
    cfg_denoiser(unet, cond[:1])(x, t)
    assert torch.equal(unet.calls[0][2], cond[:1].expand(B, L, D))
    unet = RecordingUNet()
    cfg_denoiser(unet, None)(x, t)
    assert unet.calls[0][2] is None
    with pytest.raises(ValueError, match="batch"):
        cfg_denoiser(RecordingUNet(), cond[:2])(x, t)


def test_x0_parameterization_is_converted_to_eps():
    # An oracle x0-model: for x_t = sqrt(abar) x0 + sqrt(1 - abar) eps it returns x0, so the
    # wrapper must return eps. With guidance, the guided x0 is the x0 of the guided eps.
    g = torch.Generator().manual_seed(2)
    abar = torch.linspace(0.999, 0.01, 1000, dtype=torch.float64)
    x0, eps = torch.randn(B, C, H, W, generator=g), torch.randn(B, C, H, W, generator=g)
    t = torch.tensor([0, 400, 999])
    a = abar[t].float().view(B, 1, 1, 1)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps
    cond = torch.zeros(B, L, D)
    uncond = torch.ones(1, L, D)

    def x0_model(x_in, t_in, c_in):
        # conditional rows predict x0, unconditional rows x0 + 1
        shift = c_in.mean((1, 2)).view(-1, 1, 1, 1)
        return torch.cat([x0] * (x_in.shape[0] // B)) + shift

    out = cfg_denoiser(x0_model, cond, None, 1.0, "x0", abar)(x, t)
    torch.testing.assert_close(out, eps, rtol=1e-4, atol=1e-4)
    guided = cfg_denoiser(x0_model, cond, uncond, 2.0, "x0", abar)(x, t)
    # guided x0 = (x0 + 1) + 2 (x0 - (x0 + 1)) = x0 - 1
    expected = (x - a.sqrt() * (x0 - 1)) / (1 - a).sqrt()
    torch.testing.assert_close(guided, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x0_to_eps(x, t, x0, abar), eps, rtol=1e-4, atol=1e-4)


def test_bad_arguments():
    with pytest.raises(ValueError, match="eps, x0"):
        cfg_denoiser(RecordingUNet(), None, parameterization="v")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        cfg_denoiser(RecordingUNet(), None, parameterization="x0")
    with pytest.raises(ValueError, match="cond"):
        cfg_denoiser(RecordingUNet(), None, torch.zeros(1, L, D), 3.0)
