"""Images and metadata rows of an imagefolder for evaluation: all of them, those matching
`key=value` filters, or a training run's held-out ones."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.data import Subset

from ldm.data.imagefolder import ImageFolderDataset, load_image


def parse_where(items: list[str]) -> dict[str, str]:
    """["style=twitter", ...] -> {"style": "twitter"}; ValueError naming a malformed one."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--where {item!r} is not key=value")
        out[key] = value
    return out


def run_split(run: str | Path) -> tuple[ImageFolderDataset, list[int]]:
    """A training run's imagefolder and the indices it held out for validation (its own
    config.json: the same seeded subset `ldm.train` drew)."""
    from ldm.train import build_datasets
    from ldm.training.config import DataConfig

    path = Path(run) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"--val-of {run}: no config.json (not a training run folder)")
    data = json.loads(path.read_text())["data"]
    cfg = DataConfig(**{k: v for k, v in data.items() if k in DataConfig.__dataclass_fields__})
    if cfg.name != "imagefolder":
        raise ValueError(f"--val-of {run}: trained on data.name={cfg.name}, not an imagefolder")
    _, val = build_datasets(cfg)
    if val is None:
        raise ValueError(f"--val-of {run}: the run held nothing out (data.val_length=0)")
    if isinstance(val, Subset):
        return val.dataset, list(val.indices)
    return val, list(range(len(val)))


def select(folder: ImageFolderDataset, indices: list[int], where: dict[str, str],
           limit: int, seed: int = 0) -> list[int]:
    """The indices whose rows match `where`, at most `limit` of them (a seeded random subset,
    in index order)."""
    rows = folder.rows
    chosen = [i for i in indices if all(str(rows[i].get(k)) == v for k, v in where.items())]
    if not chosen:
        raise ValueError(f"no image of {folder.root} matches {where or 'the selection'}")
    if 0 < limit < len(chosen):
        pick = np.random.default_rng(seed).choice(len(chosen), limit, replace=False)
        chosen = [chosen[i] for i in sorted(pick)]
    return chosen


def load_images(folder: ImageFolderDataset, indices: list[int], size: int) -> np.ndarray:
    """uint8 (N, size, size, 3) of the chosen images, over the folder's background."""
    return np.stack([load_image(folder.items[i][0], size, folder.background) for i in indices])
