"""Training-state checkpoints: written atomically, read with `weights_only=True`.

A checkpoint holds model, EMA, optimizers, LR schedulers, torch RNG state and the step. It
is written to a temporary file in the same folder, fsynced, then renamed over the old one, so
a crash (even `kill -9`) mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_state(path: str | Path) -> dict:
    """Load a training checkpoint; pickled code is refused (weights_only)."""
    return torch.load(path, map_location="cpu", weights_only=True)
