"""DDIM against a reference that follows CompVis's DDIMSampler line by line."""
import numpy as np
import pytest
import torch

from ldm.samplers import cfg_denoiser, ddim_schedule, ddim_timesteps, sample_ddim

T = 1000


def compvis_ddim(unet, cond, uncond, scale, x_T, alphas_cumprod, S, eta, noise):
    """DDIMSampler.make_schedule + ddim_sampling + p_sample_ddim, written out as CompVis does."""
    c = T // S
    ddim_ts = np.asarray(list(range(0, T, c))) + 1
    alphacums = alphas_cumprod.cpu()
    alphas = alphacums[ddim_ts]
    alphas_prev = np.asarray([alphacums[0]] + alphacums[ddim_ts[:-1]].tolist())
    sigmas = eta * np.sqrt(
        (1 - alphas_prev) / (1 - alphas.numpy().astype(np.float64))
        * (1 - alphas.numpy().astype(np.float64) / alphas_prev)
    )
    sqrt_one_minus_alphas = (1.0 - alphas).sqrt()  # np.sqrt of a float32 tensor: float32

    b = x_T.shape[0]
    img = x_T
    time_range = np.flip(ddim_ts)
    total = ddim_ts.shape[0]
    for i, step in enumerate(time_range):
        index = total - i - 1
        ts = torch.full((b,), int(step), dtype=torch.long)
        x_in = torch.cat([img] * 2)
        t_in = torch.cat([ts] * 2)
        c_in = torch.cat([uncond, cond])
        e_u, e_t = unet(x_in, t_in, c_in).chunk(2)
        e_t = e_u + scale * (e_t - e_u)
        a_t = torch.full((b, 1, 1, 1), float(alphas[index]))
        a_prev = torch.full((b, 1, 1, 1), float(alphas_prev[index]))
        sigma_t = torch.full((b, 1, 1, 1), float(sigmas[index]))
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), float(sqrt_one_minus_alphas[index]))
        pred_x0 = (img - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        img = a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * noise(img.shape)
    return img


def _inputs(batch=2):
    g = torch.Generator().manual_seed(3)
    x_T = torch.randn(batch, 3, 6, 6, generator=g)
    cond = torch.randn(batch, 4, 5, generator=g)
    uncond = torch.randn(1, 4, 5, generator=g).expand(batch, 4, 5)
    return x_T, cond, uncond


def test_ddim_timesteps_match_compvis():
    # make_ddim_timesteps("uniform", S, 1000) values, written out.
    t50 = ddim_timesteps(1000, 50)
    assert t50.dtype == torch.int64 and t50.shape == (50,)
    assert t50[:4].tolist() == [1, 21, 41, 61] and t50[-2:].tolist() == [961, 981]
    assert ddim_timesteps(1000, 20)[:3].tolist() == [1, 51, 101]
    assert ddim_timesteps(1000, 20)[-1].item() == 951
    assert ddim_timesteps(1000, 250)[-3:].tolist() == [989, 993, 997]
    # 1000 // 30 = 33: 31 timesteps 1, 34, ..., 991 (CompVis gives more than asked).
    t30 = ddim_timesteps(1000, 30)
    assert t30.shape == (31,) and t30[:3].tolist() == [1, 34, 67] and t30[-1].item() == 991
    assert ddim_timesteps(1000, 1).tolist() == [1]


def test_ddim_timesteps_where_compvis_overflows():
    # c = 333: CompVis would index t = 1000; we use 999 for the noisiest step.
    assert ddim_timesteps(1000, 3).tolist() == [1, 334, 667, 999]
    assert ddim_timesteps(1000, 27)[-2:].tolist() == [963, 999]
    # c = 1: 1..1000 -> 1..999, the repeated 999 dropped.
    assert ddim_timesteps(1000, 1000).tolist() == list(range(1, 1000))
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(1000, 0)


def test_ddim_schedule_sigmas_closed_form(model_alphas_cumprod):
    ac = model_alphas_cumprod.double()
    sched = ddim_schedule(ac, 10, eta=0.7)
    t = [1 + 100 * k for k in range(10)]
    a, ap = ac[t], torch.cat([ac[:1], ac[t[:-1]]])
    # Song et al. eq. 16: sigma = eta sqrt((1 - a_prev)/(1 - a_t)) sqrt(1 - a_t / a_prev)
    expected = 0.7 * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
    torch.testing.assert_close(sched.sigmas, expected, rtol=1e-12, atol=0)
    assert torch.equal(sched.alphas_prev, ap)
    assert torch.equal(ddim_schedule(ac, 10, 0.0).sigmas, torch.zeros(10, dtype=ac.dtype))


@pytest.mark.parametrize("steps", [50, 7])
def test_ddim_eta0_equals_compvis(steps, model_alphas_cumprod, make_unet):
    ac = model_alphas_cumprod
    unet = make_unet(seed=1)
    x_T, cond, uncond = _inputs()
    eps_fn = cfg_denoiser(unet, cond, uncond, guidance_scale=4.0)
    ours = sample_ddim(eps_fn, x_T, ac, steps, eta=0.0)
    ref = compvis_ddim(unet, cond, uncond, 4.0, x_T, ac, steps, 0.0, torch.zeros)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert ours.abs().max() > 0.1  # not a degenerate all-zero comparison


def test_ddim_eta_positive_uses_only_the_generator(model_alphas_cumprod, make_unet):
    ac = model_alphas_cumprod
    unet = make_unet(seed=1)
    x_T, cond, uncond = _inputs()
    eps_fn = cfg_denoiser(unet, cond, uncond, guidance_scale=2.0)

    state = torch.get_rng_state()
    a = sample_ddim(eps_fn, x_T, ac, 10, eta=1.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG was not touched
    b = sample_ddim(eps_fn, x_T, ac, 10, eta=1.0, generator=torch.Generator().manual_seed(5))
    c = sample_ddim(eps_fn, x_T, ac, 10, eta=1.0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-2

    # Same noise stream fed to the CompVis loop: one (B, C, H, W) draw per step.
    g = torch.Generator().manual_seed(5)
    ref = compvis_ddim(unet, cond, uncond, 2.0, x_T, ac, 10, 1.0,
                       lambda shape: torch.randn(shape, generator=g))
    torch.testing.assert_close(a, ref, rtol=0, atol=1e-6)


def test_ddim_callback_once_per_step_in_order(model_alphas_cumprod, make_unet):
    ac = model_alphas_cumprod
    x_T, cond, _ = _inputs()
    seen = []

    def callback(i, total, x, pred_x0):
        assert x.shape == pred_x0.shape == x_T.shape
        seen.append((i, total))

    sample_ddim(cfg_denoiser(make_unet(seed=1), cond), x_T, ac, 8, callback=callback)
    assert seen == [(i, 8) for i in range(8)]


def test_ddim_callback_can_cancel(model_alphas_cumprod, make_unet):
    ac = model_alphas_cumprod
    x_T, cond, _ = _inputs()
    unet = make_unet(seed=1)

    def callback(i, total, x, pred_x0):
        if i == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sample_ddim(cfg_denoiser(unet, cond), x_T, ac, 8, callback=callback)
    assert len(unet.batches) == 3
