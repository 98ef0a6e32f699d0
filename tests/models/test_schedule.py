"""Beta schedules against closed forms written here in numpy (float64), and `alphas_cumprod`
against the buffer a DDPM registers."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ldm.config import DiffusionConfig, UNetConfig
from ldm.models.diffusion import DDPM
from ldm.models.schedule import alphas_cumprod, extract_into_tensor, make_beta_schedule


@pytest.mark.parametrize(
    "n, start, end", [(1000, 1e-4, 2e-2), (1000, 8.5e-4, 1.2e-2), (7, 1e-3, 0.1)]
)
def test_linear_is_squared_linspace_of_square_roots(n: int, start: float, end: float) -> None:
    betas = make_beta_schedule("linear", n, linear_start=start, linear_end=end)
    step = (math.sqrt(end) - math.sqrt(start)) / (n - 1)
    expected = np.array([(math.sqrt(start) + i * step) ** 2 for i in range(n)])
    assert betas.dtype == np.float64 and betas.shape == (n,)
    np.testing.assert_allclose(betas, expected, rtol=1e-12, atol=0)
    assert betas[0] == pytest.approx(start, rel=1e-12)
    assert betas[-1] == pytest.approx(end, rel=1e-12)


@pytest.mark.parametrize("n, start, end", [(1000, 1e-4, 2e-2), (5, 1e-3, 0.1)])
def test_sqrt_linear_and_sqrt(n: int, start: float, end: float) -> None:
    ramp = np.array([start + i * (end - start) / (n - 1) for i in range(n)])
    sqrt_linear = make_beta_schedule("sqrt_linear", n, linear_start=start, linear_end=end)
    sqrt = make_beta_schedule("sqrt", n, linear_start=start, linear_end=end)
    assert sqrt_linear.dtype == np.float64 and sqrt.dtype == np.float64
    # CompVis's names: "sqrt_linear" is the plain linear ramp, "sqrt" is its square root.
    np.testing.assert_allclose(sqrt_linear, ramp, rtol=1e-12, atol=0)
    np.testing.assert_allclose(sqrt, np.sqrt(ramp), rtol=1e-12, atol=0)


@pytest.mark.parametrize("n, s", [(1000, 8e-3), (50, 8e-3), (200, 0.02)])
def test_cosine_matches_nichol_dhariwal(n: int, s: float) -> None:
    def alpha_bar(t: float) -> float:
        return math.cos((t / n + s) / (1 + s) * math.pi / 2) ** 2

    expected = np.array(
        [min(max(1 - alpha_bar(i + 1) / alpha_bar(i), 0.0), 0.999) for i in range(n)]
    )
    betas = make_beta_schedule("cosine", n, cosine_s=s)
    assert betas.dtype == np.float64 and betas.shape == (n,)
    np.testing.assert_allclose(betas, expected, rtol=1e-9, atol=1e-15)
    # alpha_bar(T) = cos^2(pi/2) = 0, so the last beta hits the 0.999 clip.
    assert betas[-1] == 0.999
    # The product of alphas reproduces alpha_bar(t) / alpha_bar(0) before the clip bites.
    prod = np.cumprod(1 - betas)[: n // 2]
    closed = np.array([alpha_bar(i + 1) / alpha_bar(0) for i in range(n // 2)])
    np.testing.assert_allclose(prod, closed, rtol=1e-9)


def test_unknown_schedule_names_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="sqrt_linear"):
        make_beta_schedule("quadratic", 10)  # type: ignore[arg-type]


def test_extract_into_tensor_gathers_and_broadcasts() -> None:
    a = torch.arange(10, dtype=torch.float32) * 0.5
    t = torch.tensor([0, 3, 9])
    out = extract_into_tensor(a, t, torch.Size([3, 4, 5, 6]))
    assert out.shape == (3, 1, 1, 1)
    assert out.flatten().tolist() == [0.0, 1.5, 4.5]


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"beta_schedule": "cosine", "timesteps": 50, "parameterization": "x0"},
        {"beta_schedule": "sqrt_linear", "linear_start": 8.5e-4, "linear_end": 1.2e-2},
        {"beta_schedule": "sqrt", "timesteps": 20, "v_posterior": 0.3},
        {"given_betas": (0.1, 0.2, 0.3, 0.4)},
    ],
)
def test_alphas_cumprod_of_a_config_is_the_ddpm_buffer(options: dict) -> None:
    cfg = DiffusionConfig(conditioning_key=None, use_ema=False, **options)
    unet = UNetConfig(
        image_size=8, in_channels=4, out_channels=4, model_channels=32, num_res_blocks=1,
        attention_resolutions=(), channel_mult=(1,), num_head_channels=32,
    )
    model, ab = DDPM(cfg, unet), alphas_cumprod(cfg)
    assert ab.dtype == np.float64 and ab.shape == (model.num_timesteps,)
    assert torch.equal(model.alphas_cumprod, torch.tensor(ab, dtype=torch.float32))
    # alpha_bar_t = prod_{s<=t} (1 - beta_s), written out here.
    if cfg.given_betas is not None:
        betas = np.asarray(cfg.given_betas)
    else:
        betas = make_beta_schedule(
            cfg.beta_schedule, cfg.timesteps, cfg.linear_start, cfg.linear_end, cfg.cosine_s
        )
    np.testing.assert_allclose(ab, [np.prod(1 - betas[: t + 1]) for t in range(len(betas))],
                               rtol=1e-12)
