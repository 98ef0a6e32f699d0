"""When a run's steps happen: the batches of each step, the learning rate, the time budget.

- `BatchSchedule`: each step's global batch (a function of the step and the data seed, so a
  resumed run sees the batches the uninterrupted one would have);
- `lr_lambda`: linear warm-up, then constant or cosine decay, ending at the run's horizon;
- `TimeBudget`: the horizon a `train.max_minutes` budget reaches at the measured speed.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch

from ldm.training import randomness
from ldm.training.config import LoopConfig, OptimConfig


class BatchSchedule(torch.utils.data.Sampler):
    """Yields this process's slice of the global batch for each step from `start`."""

    def __init__(self, length: int, cfg: LoopConfig, seed: int, start: int, rank: int, world: int):
        self.length, self.cfg, self.seed, self.start = length, cfg, seed, start
        self.rank, self.world = rank, world
        self.local = cfg.batch_size // world

    def __len__(self) -> int:
        return self.cfg.max_steps - self.start

    def __iter__(self):
        for step in range(self.start, self.cfg.max_steps):
            idx = randomness.global_indices(step, self.cfg.batch_size, self.length, self.seed)
            yield idx[self.rank * self.local : (self.rank + 1) * self.local].tolist()


def lr_lambda(cfg: OptimConfig, max_steps: int | Callable[[], int]):
    """Linear warm-up, then constant or cosine decay to lr * min_lr_ratio at `max_steps` (a
    number, or a function giving it: a time budget sets it once the speed is known)."""
    horizon = max_steps if callable(max_steps) else (lambda: max_steps)

    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, horizon() - cfg.warmup_steps)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cos

    return f


class TimeBudget:
    """Fits a run into `seconds` (train.max_minutes, counted over resumes): once the speed is
    measured (after 20 steps and 5 % of the budget, or 10 % of it: early steps are noisy)
    the LR schedule's end becomes the step the budget reaches, at most max_steps. Measured
    once, because moving the end of a cosine schedule moves the learning rate."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.settled = seconds <= 0
        self.rate = 0.0

    def horizon(self, step: int, first: int, t0: float, spent_total: float,
                max_steps: int) -> int | None:
        """The new horizon when it is time to set it, else None."""
        if self.settled:
            return None
        done, spent = step - first, time.time() - t0
        if not ((done >= 20 and spent >= 0.05 * self.seconds) or spent >= 0.1 * self.seconds):
            return None
        self.settled = True
        self.rate = done / max(spent, 1e-9)
        left = max(self.seconds - spent_total, 0.0)
        return max(step, min(max_steps, step + int(self.rate * left * 0.98)))


def clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    minutes, sec = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{sec:02d}"
