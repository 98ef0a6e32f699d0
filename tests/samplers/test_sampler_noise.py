"""Sampler noise comes from its generator's device: a CPU generator works with latents on any
device (CUDA latents with a CPU generator used to raise), with the numbers CPU sampling gives."""
from __future__ import annotations

import torch

from ldm.samplers.noise import noise_like


def test_a_cpu_generator_gives_the_cpu_numbers_in_the_latents_dtype():
    x = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    got = noise_like(x, torch.Generator().manual_seed(3))
    want = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert got.dtype == torch.float64 and torch.equal(got, want)


def test_noise_follows_the_latents_device_not_the_generators():
    x = torch.empty(2, 4, 8, 8, device="meta")  # any device other than the generator's
    assert noise_like(x, torch.Generator().manual_seed(0)).device == x.device
    if torch.cuda.is_available():
        x = torch.zeros(2, 4, 8, 8, device="cuda")
        got = noise_like(x, torch.Generator().manual_seed(5))
        want = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
        assert got.is_cuda and torch.equal(got.cpu(), want)


def test_without_a_generator_the_global_rng_draws_it():
    torch.manual_seed(7)
    a = noise_like(torch.zeros(3), None)
    torch.manual_seed(7)
    assert torch.equal(a, torch.randn(3))
