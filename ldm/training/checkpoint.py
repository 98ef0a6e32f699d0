"""Training-state checkpoints: written atomically, read with `weights_only=True`.

A checkpoint holds model, EMA, optimizers, LR schedulers, torch RNG state, the step and the
training wall time so far (`elapsed`, seconds). It is written to a temporary file in the same
folder, fsynced, then renamed over the old one, so a crash (even `kill -9`) mid-write leaves
the previous checkpoint intact.
"""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call `write(f)` on a temporary file beside `path`, fsync, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def load_state(path: str | Path) -> dict:
    """Load a training checkpoint; pickled code is refused (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
