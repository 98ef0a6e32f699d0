"""Serving fixtures: a tiny LDM whose images depend visibly on the prompt, and its pieces.

`make_tiny_ldm()` has near-zero output layers (CompVis zero-inits, perturbed by 0.02), so
its images hardly depend on the prompt (two prompts agree to ~56 dB PSNR): a parity test at
40 dB could not tell a served pipeline that ignores the prompt from a correct one. Scaling up
the transformer outputs, the cross-attention values and the UNet's last layer makes two
prompts differ by ~22 dB and a negative prompt by ~38 dB, with finite, unsaturated images.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny_ldm, sync_ema


def make_prompt_sensitive_ldm():
    model = make_tiny_ldm()
    with torch.no_grad():
        for name, p in model.model.named_parameters():
            if ".proj_out." in name:
                p.mul_(30)
            elif ".attn2.to_v." in name:
                p.mul_(5)
            elif name.startswith("diffusion_model.out.2."):
                p.mul_(20)
    sync_ema(model)
    return model.eval()


@pytest.fixture(scope="session")
def served_ldm_dir(tmp_path_factory):
    """Our-format checkpoint folder of `make_prompt_sensitive_ldm()`."""
    from ldm.pretrained import save_pretrained

    model = make_prompt_sensitive_ldm()
    folder = tmp_path_factory.mktemp("served") / "model"
    save_pretrained(folder, model, "ldm", model.config)
    return folder


@pytest.fixture(scope="module")
def triton(served_ldm_dir, tmp_path_factory):
    """A Triton server on the served model, one per test module that asks for it."""
    from tests.server.serving import served_triton

    with served_triton(served_ldm_dir, tmp_path_factory) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(triton):
    """The gateway in front of `triton`; yields its base URL."""
    from server.gateway import GatewaySettings
    from tests.server.serving import running_gateway

    with running_gateway(GatewaySettings(triton_url=triton.grpc_url, timeout=60)) as url:
        yield url


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 image arrays (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
