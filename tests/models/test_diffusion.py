"""DDPM / LatentDiffusion against closed forms (Ho et al. 2020) and CompVis's state-dict layout.

Every expected value here is computed independently in the test (numpy float64 closed forms,
or the UNet called directly), never read back from the code under test.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.config import (
    AutoencoderConfig,
    DDConfig,
    DiffusionConfig,
    LDMConfig,
    TextEncoderConfig,
    UNetConfig,
)
from ldm.models.autoencoder import AutoencoderKL
from ldm.models.diffusion import DDPM, LatentDiffusion
from ldm.modules.text_encoder import BERTEmbedder
from ldm.modules.unet import UNetModel

# The buffers CompVis's DDPM.register_schedule writes into a checkpoint, in registration order.
SCHEDULE_BUFFERS = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
]


def tiny_unet() -> UNetConfig:
    return UNetConfig(
        image_size=16,
        in_channels=4,
        out_channels=4,
        model_channels=32,
        num_res_blocks=1,
        attention_resolutions=(1,),
        channel_mult=(1, 2),
        num_head_channels=16,
        use_spatial_transformer=True,
        context_dim=32,
    )


def tiny_ldm(**diffusion: object) -> LDMConfig:
    return LDMConfig(
        diffusion=DiffusionConfig(image_size=16, channels=4, **diffusion),  # type: ignore[arg-type]
        unet=tiny_unet(),
        first_stage=AutoencoderConfig(
            ddconfig=DDConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32),
            embed_dim=4,
        ),
        cond_stage=TextEncoderConfig(n_embed=32, n_layer=1),
    )


def closed_form_schedule(n: int = 1000, start: float = 1e-4, end: float = 2e-2) -> dict:
    """beta, alpha, alpha_bar, alpha_bar_prev in float64 for the 'linear' schedule."""
    step = (math.sqrt(end) - math.sqrt(start)) / (n - 1)
    betas = np.array([(math.sqrt(start) + i * step) ** 2 for i in range(n)])
    alphas = 1 - betas
    alpha_bar = np.cumprod(alphas)
    alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
    return dict(betas=betas, alphas=alphas, ab=alpha_bar, ab_prev=alpha_bar_prev)


def randomize_(module: torch.nn.Module, seed: int = 0, std: float = 0.05) -> None:
    """Give every parameter random values (the UNet's output conv starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def ddpm(**kwargs: object) -> DDPM:
    return DDPM(DiffusionConfig(image_size=16, channels=4, **kwargs), tiny_unet())  # type: ignore[arg-type]


def f32(a: np.ndarray) -> torch.Tensor:
    return torch.tensor(a, dtype=torch.float32)


# --- schedule buffers -------------------------------------------------------------------


def test_schedule_buffers_names_dtypes_and_persistence() -> None:
    m = ddpm()
    persistent = [k for k in m.state_dict() if "." not in k]
    assert persistent == SCHEDULE_BUFFERS
    buffers = dict(m.named_buffers())
    assert "lvlb_weights" in buffers and "lvlb_weights" not in m.state_dict()
    for name in [*SCHEDULE_BUFFERS, "lvlb_weights"]:
        assert buffers[name].dtype == torch.float32 and buffers[name].shape == (1000,), name
    # logvar: a plain tensor, neither parameter nor buffer, unless learned.
    assert isinstance(m.logvar, torch.Tensor) and not isinstance(m.logvar, torch.nn.Parameter)
    assert "logvar" not in dict(m.named_parameters()) and m.num_timesteps == 1000
    assert torch.equal(m.logvar, torch.zeros(1000))


def test_learned_logvar_is_a_parameter_in_the_state_dict() -> None:
    m = ddpm(learn_logvar=True, logvar_init=-0.5)
    assert isinstance(m.logvar, torch.nn.Parameter) and m.logvar.requires_grad
    assert list(m.state_dict())[0] == "logvar"
    assert torch.equal(m.state_dict()["logvar"], torch.full((1000,), -0.5))


def test_schedule_buffers_match_closed_forms() -> None:
    m = ddpm()
    s = closed_form_schedule()
    ab, ab_prev = s["ab"], s["ab_prev"]
    expected = {
        "betas": s["betas"],
        "alphas_cumprod": ab,
        "alphas_cumprod_prev": ab_prev,
        "sqrt_alphas_cumprod": np.sqrt(ab),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1 - ab),
        "log_one_minus_alphas_cumprod": np.log(1 - ab),
        "sqrt_recip_alphas_cumprod": 1 / np.sqrt(ab),
        "sqrt_recipm1_alphas_cumprod": np.sqrt((1 - ab) / ab),
    }
    for name, value in expected.items():
        # float32 storage of a float64 computation: equal to float32 rounding.
        torch.testing.assert_close(getattr(m, name), f32(value), rtol=2e-6, atol=0, msg=name)


def test_posterior_matches_ho_et_al_eq_7_and_bayes_rule() -> None:
    m = ddpm()
    s = closed_form_schedule()
    b, a, ab, ab_prev = s["betas"], s["alphas"], s["ab"], s["ab_prev"]
    # Eq. 7: mu_tilde = sqrt(ab_{t-1}) b_t / (1 - ab_t) x_0
    #                  + sqrt(a_t) (1 - ab_{t-1}) / (1 - ab_t) x_t
    torch.testing.assert_close(m.posterior_mean_coef1, f32(np.sqrt(ab_prev) * b / (1 - ab)))
    torch.testing.assert_close(m.posterior_mean_coef2, f32(np.sqrt(a) * (1 - ab_prev) / (1 - ab)))
    beta_tilde = (1 - ab_prev) / (1 - ab) * b
    torch.testing.assert_close(m.posterior_variance, f32(beta_tilde))
    assert m.posterior_variance[0] == 0
    # Bayes: q(x_{t-1}|x_t,x_0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(ab_{t-1}) x_0,
    # 1 - ab_{t-1}); precision and mean of that product, for t >= 1.
    precision = 1 / (1 - ab_prev[1:]) + a[1:] / b[1:]
    torch.testing.assert_close(m.posterior_variance[1:], f32(1 / precision))
    log_clipped = np.log(np.concatenate([[1e-20], beta_tilde[1:]]))
    torch.testing.assert_close(m.posterior_log_variance_clipped, f32(log_clipped))

    x0, xt = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([1, 500, 999])
    mean, var, logvar = m.q_posterior(x0, xt, t)
    tn = t.numpy()
    w0 = np.sqrt(ab_prev[tn]) / (1 - ab_prev[tn]) / precision[tn - 1]
    wt = np.sqrt(a[tn]) / b[tn] / precision[tn - 1]
    expected = f32(w0)[:, None, None, None] * x0 + f32(wt)[:, None, None, None] * xt
    torch.testing.assert_close(mean, expected, rtol=1e-5, atol=1e-6)
    assert var.shape == (3, 1, 1, 1) and logvar.shape == (3, 1, 1, 1)


def test_v_posterior_blends_beta_tilde_and_beta() -> None:
    m = ddpm(v_posterior=0.3)
    s = closed_form_schedule()
    beta_tilde = (1 - s["ab_prev"]) / (1 - s["ab"]) * s["betas"]
    torch.testing.assert_close(m.posterior_variance, f32(0.7 * beta_tilde + 0.3 * s["betas"]))


def test_lvlb_weights_eps_parameterisation() -> None:
    m = ddpm(parameterization="eps")
    s = closed_form_schedule()
    beta_tilde = (1 - s["ab_prev"]) / (1 - s["ab"]) * s["betas"]
    with np.errstate(divide="ignore"):
        w = s["betas"] ** 2 / (2 * beta_tilde * s["alphas"] * (1 - s["ab"]))
    w[0] = w[1]
    # CompVis evaluates this in float32 from the float32 buffers; 1 - alpha_bar_t cancels for
    # small t, so it agrees with the float64 value to ~1e-4 only...
    torch.testing.assert_close(m.lvlb_weights, f32(w), rtol=2e-4, atol=0)
    # ...and exactly with the same formula on float32 inputs.
    b32, a32, ab32 = f32(s["betas"]), f32(s["alphas"]), f32(s["ab"])
    w32 = b32**2 / (2 * f32(beta_tilde) * a32 * (1 - ab32))
    w32[0] = w32[1]
    assert torch.equal(m.lvlb_weights, w32)


def test_lvlb_weights_x0_parameterisation_keeps_compvis_formula() -> None:
    m = ddpm(parameterization="x0")
    ab = closed_form_schedule()["ab"]
    w = 0.5 * np.sqrt(ab) / (2.0 - ab)  # CompVis: `(2. * 1 - alphas_cumprod)`
    w[0] = w[1]
    torch.testing.assert_close(m.lvlb_weights, f32(w), rtol=1e-6, atol=0)
    # Bit-exact with CompVis's float32 evaluation (numpy's sqrt on float32 alpha_bar).
    ab32 = ab.astype(np.float32)
    w32 = np.float32(0.5) * np.sqrt(ab32) / (np.float32(2.0) - ab32)
    w32[0] = w32[1]
    assert torch.equal(m.lvlb_weights, torch.from_numpy(w32))


def test_given_betas_override_the_schedule() -> None:
    betas = (0.1, 0.2, 0.3, 0.4)
    m = ddpm(given_betas=betas, timesteps=1000)
    assert m.num_timesteps == 4
    torch.testing.assert_close(m.alphas_cumprod, f32(np.cumprod([0.9, 0.8, 0.7, 0.6])))


def test_bad_choices_are_rejected() -> None:
    with pytest.raises(ValueError, match="parameterization"):
        ddpm(parameterization="v")
    with pytest.raises(ValueError, match="loss_type"):
        ddpm(loss_type="huber")


# --- forward process --------------------------------------------------------------------


def test_q_sample_mean_and_variance() -> None:
    m = ddpm()
    ab = closed_form_schedule()["ab"]
    n, x0_value = 200_000, 0.7
    g = torch.Generator().manual_seed(0)
    for step in (0, 250, 999):
        x0 = torch.full((n, 1, 1, 1), x0_value)
        t = torch.full((n,), step, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=g)
        xt = m.q_sample(x0, t, noise)
        mean, var = math.sqrt(ab[step]) * x0_value, 1 - ab[step]
        # Exact for a given eps, and the right moments over eps ~ N(0, I).
        torch.testing.assert_close(
            xt, mean + math.sqrt(var) * noise, rtol=1e-5, atol=1e-6
        )
        assert abs(xt.mean().item() - mean) < 5 * math.sqrt(var / n)
        assert abs(xt.var().item() / var - 1) < 5 * math.sqrt(2 / n)
        q_mean, q_var, q_logvar = m.q_mean_variance(x0[:2], t[:2])
        torch.testing.assert_close(q_mean, torch.full((2, 1, 1, 1), mean))
        torch.testing.assert_close(q_var, torch.full((2, 1, 1, 1), var))
        torch.testing.assert_close(q_logvar, torch.full((2, 1, 1, 1), math.log(var)))


def test_predict_start_from_noise_inverts_q_sample() -> None:
    m = ddpm()
    x0, eps = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    t = torch.tensor([0, 10, 500, 900])
    xt = m.q_sample(x0, t, eps)
    torch.testing.assert_close(m.predict_start_from_noise(xt, t, eps), x0, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.predict_eps_from_start(xt, t, x0), eps, rtol=1e-3, atol=1e-3)


# --- losses -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "parameterization, loss_type, learn_logvar",
    [("eps", "l2", False), ("x0", "l1", False), ("eps", "l1", True), ("x0", "l2", True)],
)
def test_p_losses_equals_independent_computation(
    parameterization: str, loss_type: str, learn_logvar: bool
) -> None:
    m = ddpm(
        parameterization=parameterization,
        loss_type=loss_type,
        learn_logvar=learn_logvar,
        logvar_init=0.25,
        l_simple_weight=0.7,
        original_elbo_weight=0.3,
    )
    randomize_(m.model)
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(3, 4, 16, 16, generator=g)
    noise = torch.randn(3, 4, 16, 16, generator=g)
    context = torch.randn(3, 5, 32, generator=g)
    t = torch.tensor([0, 420, 999])

    s = closed_form_schedule()
    ab = f32(s["ab"])[t][:, None, None, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        out = m.model.diffusion_model(xt, t, context=context)
        loss, logs = m.p_losses(x0, t, context, noise=noise)
    target = noise if parameterization == "eps" else x0
    err = (out - target).abs() if loss_type == "l1" else (out - target) ** 2
    per_sample = err.mean(dim=(1, 2, 3))
    # CompVis applies logvar_t = logvar_init whether or not it is learned.
    gamma = per_sample / math.exp(0.25) + 0.25
    if parameterization == "eps":
        beta_tilde = (1 - s["ab_prev"]) / (1 - s["ab"]) * s["betas"]
        with np.errstate(divide="ignore"):
            w = s["betas"] ** 2 / (2 * beta_tilde * s["alphas"] * (1 - s["ab"]))
    else:
        w = 0.5 * np.sqrt(s["ab"]) / (2.0 - s["ab"])
    w[0] = w[1]
    vlb = (f32(w)[t] * per_sample).mean()
    expected = 0.7 * gamma.mean() + 0.3 * vlb

    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs["train/loss_simple"], per_sample.mean(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(logs["train/loss_vlb"], vlb, rtol=1e-4, atol=1e-6)
    assert logs["train/loss"] is loss
    keys = {"train/loss_simple", "train/loss_vlb", "train/loss"}
    if learn_logvar:
        keys |= {"train/loss_gamma", "logvar"}
        torch.testing.assert_close(logs["train/loss_gamma"], gamma.mean(), rtol=1e-4, atol=1e-6)
    assert set(logs) == keys


def test_loss_dict_prefix_follows_training_mode() -> None:
    m = ddpm()
    x0, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 32), torch.tensor([1, 2])
    m.eval()
    with torch.no_grad():
        _, logs = m.p_losses(x0, t, ctx)
    assert set(logs) == {"val/loss_simple", "val/loss_vlb", "val/loss"}


def test_get_loss_reductions() -> None:
    pred, target = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.0, 0.0, 1.0])
    l1, l2 = ddpm(loss_type="l1"), ddpm(loss_type="l2")
    assert torch.equal(l1.get_loss(pred, target, mean=False), torch.tensor([1.0, 2.0, 2.0]))
    assert l1.get_loss(pred, target).item() == pytest.approx(5 / 3)
    assert torch.equal(l2.get_loss(pred, target, mean=False), torch.tensor([1.0, 4.0, 4.0]))
    assert l2.get_loss(pred, target).item() == pytest.approx(3.0)


def test_p_mean_variance_and_p_sample_at_t0() -> None:
    m = ddpm(clip_denoised=False)
    randomize_(m.model)
    x, ctx, t = torch.randn(2, 4, 16, 16), torch.randn(2, 3, 32), torch.tensor([0, 0])
    with torch.no_grad():
        eps = m.model.diffusion_model(x, t, context=ctx)
        mean, _, _, x0_hat = m.p_mean_variance(x, t, ctx, return_x0=True)
        sample = m.p_sample(x, t, ctx, generator=torch.Generator().manual_seed(0))
    ab0 = closed_form_schedule()["ab"][0]
    torch.testing.assert_close(x0_hat, (x - math.sqrt(1 - ab0) * eps) / math.sqrt(ab0))
    # At t = 0, alpha_bar_prev = 1: the posterior mean is x_0_hat itself and no noise is added.
    torch.testing.assert_close(mean, x0_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sample, mean)


# --- EMA ---------------------------------------------------------------------------------


def test_ema_scope_swaps_weights_and_restores_them() -> None:
    m = ddpm()
    original = {k: v.clone() for k, v in m.model.named_parameters()}
    with torch.no_grad():
        for p in m.model.parameters():
            p.add_(1.0)
    trained = {k: v.clone() for k, v in m.model.named_parameters()}
    with m.ema_scope("test"):
        for k, v in m.model.named_parameters():
            assert torch.equal(v, original[k]), k
    for k, v in m.model.named_parameters():
        assert torch.equal(v, trained[k]), k
    # One EMA step with num_updates=1: decay = min(0.9999, 2/11) -> shadow moves 9/11 of the way.
    m.update_ema()
    name = "diffusion_model.out.2.weight"
    shadow = dict(m.model_ema.named_buffers())[name.replace(".", "")]
    torch.testing.assert_close(shadow, original[name] + 9 / 11, rtol=1e-6, atol=1e-6)


def test_ema_scope_is_a_no_op_without_ema() -> None:
    m = ddpm(use_ema=False)
    assert m.model_ema is None
    assert not any(k.startswith("model_ema") for k in m.state_dict())
    before = [p.clone() for p in m.model.parameters()]
    with m.ema_scope():
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, m.model.parameters(), strict=True))


# --- LatentDiffusion --------------------------------------------------------------------


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
