"""PLMS against a reference that follows CompVis's PLMSSampler line by line."""
import numpy as np
import pytest
import torch

from ldm.samplers import cfg_denoiser, sample_plms

T = 1000


def compvis_plms(unet, cond, uncond, scale, x_T, alphas_cumprod, S):
    """PLMSSampler.make_schedule + plms_sampling + p_sample_plms (eta = 0), as CompVis writes it."""
    c = T // S
    ddim_ts = np.asarray(list(range(0, T, c))) + 1
    alphas = alphas_cumprod[ddim_ts]
    alphas_prev = np.asarray([alphas_cumprod[0]] + alphas_cumprod[ddim_ts[:-1]].tolist())
    sqrt_one_minus_alphas = (1.0 - alphas).sqrt()
    b = x_T.shape[0]

    def get_model_output(x, t):
        e_u, e_t = unet(torch.cat([x] * 2), torch.cat([t] * 2), torch.cat([uncond, cond])).chunk(2)
        return e_u + scale * (e_t - e_u)

    def get_x_prev_and_pred_x0(x, e_t, index):
        a_t = torch.full((b, 1, 1, 1), float(alphas[index]))
        a_prev = torch.full((b, 1, 1, 1), float(alphas_prev[index]))
        sigma_t = torch.full((b, 1, 1, 1), 0.0)
        sqrt_one_minus_at = torch.full((b, 1, 1, 1), float(sqrt_one_minus_alphas[index]))
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        return a_prev.sqrt() * pred_x0 + dir_xt + sigma_t * 0.0, pred_x0

    img = x_T
    time_range = np.flip(ddim_ts)
    total = ddim_ts.shape[0]
    old_eps = []
    for i, step in enumerate(time_range):
        index = total - i - 1
        ts = torch.full((b,), int(step), dtype=torch.long)
        ts_next = torch.full((b,), int(time_range[min(i + 1, len(time_range) - 1)]),
                             dtype=torch.long)
        e_t = get_model_output(img, ts)
        if len(old_eps) == 0:
            x_prev, _ = get_x_prev_and_pred_x0(img, e_t, index)
            e_t_next = get_model_output(x_prev, ts_next)
            e_t_prime = (e_t + e_t_next) / 2
        elif len(old_eps) == 1:
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        img, _ = get_x_prev_and_pred_x0(img, e_t_prime, index)
        old_eps.append(e_t)
        if len(old_eps) >= 4:
            old_eps.pop(0)
    return img


def _inputs(batch=2):
    g = torch.Generator().manual_seed(4)
    x_T = torch.randn(batch, 3, 5, 5, generator=g)
    cond = torch.randn(batch, 4, 5, generator=g)
    uncond = torch.randn(1, 4, 5, generator=g)
    return x_T, cond, uncond


@pytest.mark.parametrize("steps", [50, 6, 1])
def test_plms_equals_compvis(steps, model_alphas_cumprod, make_unet):
    ac = model_alphas_cumprod
    x_T, cond, uncond = _inputs()
    unet = make_unet(seed=2)
    ours = sample_plms(cfg_denoiser(unet, cond, uncond, 3.0), x_T, ac, steps)
    ref_unet = make_unet(seed=2)
    ref = compvis_plms(ref_unet, cond, uncond.expand_as(cond), 3.0, x_T, ac, steps)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    assert unet.timesteps == ref_unet.timesteps


def test_plms_unet_calls(model_alphas_cumprod, make_unet):
    # S steps, S + 1 UNet calls: the first step evaluates again at the next timestep.
    ac = model_alphas_cumprod
    x_T, cond, _ = _inputs()
    unet = make_unet(seed=2)
    sample_plms(cfg_denoiser(unet, cond), x_T, ac, 5)
    assert unet.timesteps == [801, 601, 601, 401, 201, 1]


def test_plms_rejects_eta(model_alphas_cumprod):
    with pytest.raises(ValueError, match="eta must be 0"):
        sample_plms(lambda x, t: x, torch.zeros(1, 1, 2, 2), model_alphas_cumprod, 5, eta=0.5)


def test_plms_callback_once_per_step_in_order(model_alphas_cumprod, make_unet):
    ac = model_alphas_cumprod
    x_T, cond, _ = _inputs()
    seen = []
    sample_plms(cfg_denoiser(make_unet(seed=2), cond), x_T, ac, 8,
                callback=lambda i, total, x, pred_x0: seen.append((i, total)))
    assert seen == [(i, 8) for i in range(8)]
    # 1000 // 7 = 142 gives 8 CompVis timesteps; total reports the steps actually taken.
    seen.clear()
    sample_plms(cfg_denoiser(make_unet(seed=2), cond), x_T, ac, 7,
                callback=lambda i, total, x, pred_x0: seen.append((i, total)))
    assert seen == [(i, 8) for i in range(8)]
