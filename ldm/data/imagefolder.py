"""`imagefolder`: images plus `metadata.jsonl` lines `{"file_name": ..., "text": ...}`.

This is the Hugging Face imagefolder convention (extra keys in a line are kept: `rows`).
Images are resized (shorter side) and center-cropped to `size`. Transparent images (RGBA,
LA, palette images with a transparent colour) are composited over `background` (white by
default, as artwork such as emoji is drawn to be seen on a light page), not dropped to black:
their alpha is applied before resizing, so edges get no dark fringe.

Missing or unreadable files are reported by name and skipped, never fatal mid-run; so are
entries whose `file_name` is absolute or climbs out of the folder with `..` (a metadata file
must not make training read `/etc/passwd`). Symbolic links inside the folder are followed:
whoever put them there chose their targets (the Hugging Face cache, for one, links snapshot
files to blobs outside the snapshot folder).
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


def parse_color(value: str) -> tuple[int, int, int]:
    """A background colour: a name PIL knows ("white", "black", "gray"), "#rrggbb" or
    "r,g,b" (0-255); DataError naming the value otherwise."""
    from PIL import ImageColor

    try:
        if "," in value:
            rgb = tuple(int(v) for v in value.split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
            return rgb  # type: ignore[return-value]
        return ImageColor.getrgb(value)[:3]
    except ValueError:
        raise DataError(f"data.background={value!r} is not a colour (a name such as white, "
                        "#rrggbb, or r,g,b with 0-255 values)") from None


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """RGB of `im` composited over `background` where it is transparent."""
    if not has_alpha(im):
        return im.convert("RGB")
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def load_image(path: Path, size: int,
               background: tuple[int, int, int] = (255, 255, 255)) -> np.ndarray:
    """Open as RGB (over `background` where transparent), resize the shorter side to `size`,
    center-crop: uint8 (size, size, 3)."""
    return _load(path, size, background)[0]


def _load(path: Path, size: int, background: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """(load_image's array, whether the file had transparency)."""
    with Image.open(path) as im:
        alpha = has_alpha(im)
        im = flatten(im, background)
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        w, h = im.size
        left, top = (w - size) // 2, (h - size) // 2
        return np.asarray(im.crop((left, top, left + size, top + size))), alpha


def inside(root: Path, name: str) -> Path | None:
    """`root / name`, or None when `name` is absolute or its `..` parts leave `root`."""
    rel = Path(os.path.normpath(name))  # lexical: "a/../b.png" -> "b.png", "a/../../x" -> "../x"
    if rel.is_absolute() or rel.drive or rel.parts[:1] == ("..",):
        return None
    return root / rel


def read_metadata(root: Path) -> list[tuple[Path, str, dict]]:
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
        items.append((path, str(text), row))
    if not items:
        raise DataError(f"imagefolder: no usable images listed in {meta}")
    return items


class ImageFolderDataset(Dataset):
    def __init__(self, root: str | Path, size: int = 32, background: str = "white"):
        self.root, self.size = Path(root), size
        self.background = parse_color(background)
        if not self.root.is_dir():
            raise DataError(f"imagefolder: {self.root} is not a directory")
        self.items = read_metadata(self.root)
        self.bad: set[int] = set()
        self._told_alpha = False

    @property
    def rows(self) -> list[dict]:
        """Each image's metadata.jsonl object (file_name, text and any other keys)."""
        return [row for _, _, row in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        # A corrupt file is reported once and replaced by the next readable item.
        for offset in range(len(self.items)):
            i = (index + offset) % len(self.items)
            if i in self.bad:
                continue
            path, text, _ = self.items[i]
            try:
                image, alpha = _load(path, self.size, self.background)
                if alpha and not self._told_alpha:
                    self._told_alpha = True
                    log.info("imagefolder: transparent images (e.g. %s) are composited over "
                             "%s (data.background)", path.name, self.background)
                return {"image": to_tensor(image), "caption": text}
            except (OSError, UnidentifiedImageError, ValueError) as e:
                log.warning("imagefolder: %s is unreadable (%s); skipped", path, e)
                self.bad.add(i)
        raise DataError(f"imagefolder: no readable image left in {self.root}")


def collate(batch: list[dict]) -> dict:
    return {
        "image": torch.stack([b["image"] for b in batch]),
        "caption": [b["caption"] for b in batch],
    }
