"""imagefolder: transparency over a background colour, a seeded random validation subset,
a separate validation folder."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.imagefolder import DataError, ImageFolderDataset, load_image, parse_color
from ldm.train import build_datasets
from ldm.training.config import DataConfig


def write_folder(folder: Path, n: int, rgba: bool = False) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        if rgba:  # an opaque yellow disc on a transparent square, like an emoji
            a = np.zeros((32, 32, 4), np.uint8)
            yy, xx = np.mgrid[:32, :32]
            a[(yy - 16) ** 2 + (xx - 16) ** 2 < 100] = (255, 220, 0, 255)
            Image.fromarray(a, "RGBA").save(folder / f"{i}.png")
        else:
            Image.fromarray(np.full((20, 20, 3), i, np.uint8)).save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"image {i}", "category": "c"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_transparency_is_composited_over_the_background(tmp_path, caplog):
    folder = write_folder(tmp_path / "d", 1, rgba=True)
    corner, centre = (0, 0), (16, 16)
    white = load_image(folder / "0.png", 32)
    assert tuple(white[corner]) == (255, 255, 255) and tuple(white[centre]) == (255, 220, 0)
    grey = load_image(folder / "0.png", 32, parse_color("#808080"))
    assert tuple(grey[corner]) == (128, 128, 128)
    # Downsampled, the disc's edge blends into the background: no dark fringe.
    small = load_image(folder / "0.png", 8).astype(int)
    assert small.sum(axis=2).min() >= 255 + 220 - 5
    with caplog.at_level(logging.INFO, logger="ldm.data.imagefolder"):
        ImageFolderDataset(folder, 16, "black")[0]
    assert "composited over (0, 0, 0) (data.background)" in caplog.text


@pytest.mark.parametrize("value, rgb", [("white", (255, 255, 255)), ("#102030", (16, 32, 48)),
                                        ("1,2,3", (1, 2, 3))])
def test_background_colours(value, rgb):
    assert parse_color(value) == rgb


@pytest.mark.parametrize("value", ["blurple", "1,2", "300,0,0"])
def test_a_bad_background_names_the_value(value):
    with pytest.raises(DataError, match=f"data.background={value!r} is not a colour"):
        parse_color(value)


def test_extra_metadata_keys_are_kept(tmp_path):
    ds = ImageFolderDataset(write_folder(tmp_path / "d", 2), 16)
    assert ds.rows[1] == {"file_name": "1.png", "text": "image 1", "category": "c"}


def test_validation_is_a_seeded_random_subset(tmp_path):
    folder = write_folder(tmp_path / "d", 100)
    cfg = DataConfig(name="imagefolder", root=str(folder), size=16, val_length=10, seed=3)
    train, val = build_datasets(cfg)
    held = list(val.indices)
    assert len(held) == 10 and len(train) == 90 and not set(held) & set(train.indices)
    assert held != list(range(90, 100))  # not the last lines of metadata.jsonl
    assert list(build_datasets(cfg)[1].indices) == held  # the same on every run
    other = DataConfig(name="imagefolder", root=str(folder), size=16, val_length=10, seed=4)
    assert list(build_datasets(other)[1].indices) != held


def test_a_separate_validation_folder_keeps_every_training_image(tmp_path):
    train_dir, val_dir = write_folder(tmp_path / "t", 30), write_folder(tmp_path / "v", 4)
    train, val = build_datasets(DataConfig(name="imagefolder", root=str(train_dir),
                                           val_root=str(val_dir), size=16))
    assert len(train) == 30 and len(val) == 4
    train, val = build_datasets(DataConfig(name="imagefolder", root=str(train_dir),
                                           val_root=str(val_dir), size=16, val_length=0))
    assert len(train) == 30 and val is None
