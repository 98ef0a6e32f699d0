"""Sampler noise drawn where its generator lives, then moved to the latents' device.

Pipelines seed a CPU `torch.Generator` (ldm/pipeline.py, server/txt2img.py) so that a seed
gives the same image on every device. `torch.randn(..., generator=cpu_gen, device="cuda")`
raises, so the noise is drawn on the generator's device and then moved: on the CPU the
numbers are exactly those `torch.randn(shape, generator=g, dtype=x.dtype)` gives.
"""
from __future__ import annotations

import torch


def noise_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """N(0, I) with x's shape, device and dtype, from `generator` (torch's global RNG if None,
    on x's device)."""
    if generator is None:
        return torch.randn_like(x)
    z = torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype)
    return z.to(x.device)
