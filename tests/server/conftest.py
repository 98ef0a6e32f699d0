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

from tests.conftest import make_tiny_ldm


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
        if model.model_ema is not None:  # keep EMA == weights: both paths give one model
            for name, p in model.model.named_parameters():
                getattr(model.model_ema, model.model_ema.m_name2s_name[name]).copy_(p)
    return model.eval()


@pytest.fixture(scope="session")
def served_ldm_dir(tmp_path_factory):
    """Our-format checkpoint folder of `make_prompt_sensitive_ldm()`."""
    from ldm.pretrained import save_pretrained

    model = make_prompt_sensitive_ldm()
    folder = tmp_path_factory.mktemp("served") / "model"
    save_pretrained(folder, model, "ldm", model.config)
    return folder


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR in dB of two uint8 image arrays (inf when identical)."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
