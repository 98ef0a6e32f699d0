"""Per-sample randomness keyed by (seed, step, global sample index).

Every random draw of a training step (t, epsilon, posterior noise, caption dropout) comes from a
generator seeded by the sample's global position. Results therefore do not depend on how the
global batch is split across processes or micro-batches, and a resumed run replays exactly.
"""
from __future__ import annotations

import numpy as np
import torch


def global_indices(step: int, global_batch: int, length: int, seed: int) -> np.ndarray:
    """Data indices of the global batch at `step`: a fresh seeded permutation per epoch."""
    start = step * global_batch
    positions = np.arange(start, start + global_batch)
    out = np.empty(global_batch, dtype=np.int64)
    for epoch in np.unique(positions // length):
        perm = np.random.default_rng([seed, int(epoch)]).permutation(length)
        sel = positions // length == epoch
        out[sel] = perm[positions[sel] % length]
    return out


def sample_generators(seed: int, step: int, positions: list[int]) -> list[torch.Generator]:
    """One generator per sample; `positions` are places in the global batch."""
    seeds = [int(np.random.SeedSequence([seed, step, p]).generate_state(1)[0]) for p in positions]
    return [torch.Generator().manual_seed(s) for s in seeds]


def randn(gens: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """(len(gens), *shape) standard normal, row i from gens[i]."""
    return torch.stack([torch.randn(shape, generator=g) for g in gens])


def randint(gens: list[torch.Generator], high: int) -> torch.Tensor:
    return torch.cat([torch.randint(0, high, (1,), generator=g) for g in gens])


def rand(gens: list[torch.Generator]) -> torch.Tensor:
    return torch.cat([torch.rand((1,), generator=g) for g in gens])
