"""`imagefolder`: images plus `metadata.jsonl` lines `{"file_name": ..., "text": ...}`.

This is the Hugging Face imagefolder convention. Images are resized (shorter side) and
center-cropped to `size`. Missing or unreadable files are reported by name and skipped,
never fatal mid-run; so are entries whose `file_name` is absolute or climbs out of the folder
with `..` (a metadata file must not make training read `/etc/passwd`). Symbolic links inside
the folder are followed: whoever put them there chose their targets (the Hugging Face cache,
for one, links snapshot files to blobs outside the snapshot folder).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ldm.data.shapes import to_tensor

log = logging.getLogger(__name__)


class DataError(ValueError):
    """The data set cannot be used at all; the message says why."""


def load_image(path: Path, size: int) -> np.ndarray:
    """Open as RGB, resize the shorter side to `size`, center-crop: uint8 (size, size, 3)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size)))


def inside(root: Path, name: str) -> Path | None:
    """`root / name`, or None when `name` is absolute or its `..` parts leave `root`."""
    rel = Path(os.path.normpath(name))  # lexical: "a/../b.png" -> "b.png", "a/../../x" -> "../x"
    if rel.is_absolute() or rel.drive or rel.parts[:1] == ("..",):
        return None
    return root / rel


def read_metadata(root: Path) -> list[tuple[Path, str]]:
    """Parse metadata.jsonl; bad lines, files outside `root` and missing files are logged by
    name and line and skipped."""
    meta = root / "metadata.jsonl"
    if not meta.is_file():
        raise DataError(
            f"imagefolder: {meta} not found (one JSON object per line: file_name, text)")
    items = []
    for lineno, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name, text = row["file_name"], row["text"]
            if not isinstance(name, str):
                raise TypeError(f"file_name must be a string, got {name!r}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            log.warning("imagefolder: %s line %d skipped: %s", meta, lineno, e)
            continue
        path = inside(root, name)
        if path is None:
            log.warning("imagefolder: %s line %d skipped: file_name %r is outside %s",
                        meta, lineno, name, root)
            continue
        if not path.is_file():
            log.warning("imagefolder: %s (line %d) is missing; skipped", path, lineno)
            continue
        items.append((path, str(text)))
    if not items:
        raise DataError(f"imagefolder: no usable images listed in {meta}")
    return items


class ImageFolderDataset(Dataset):
    def __init__(self, root: str | Path, size: int = 32):
        self.root, self.size = Path(root), size
        if not self.root.is_dir():
            raise DataError(f"imagefolder: {self.root} is not a directory")
        self.items = read_metadata(self.root)
        self.bad: set[int] = set()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        # A corrupt file is reported once and replaced by the next readable item.
        for offset in range(len(self.items)):
            i = (index + offset) % len(self.items)
            if i in self.bad:
                continue
            path, text = self.items[i]
            try:
                return {"image": to_tensor(load_image(path, self.size)), "caption": text}
            except (OSError, UnidentifiedImageError, ValueError) as e:
                log.warning("imagefolder: %s is unreadable (%s); skipped", path, e)
                self.bad.add(i)
        raise DataError(f"imagefolder: no readable image left in {self.root}")


def collate(batch: list[dict]) -> dict:
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
    }
