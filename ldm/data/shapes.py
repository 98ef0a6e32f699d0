"""`shapes`: a captioned toy data set generated on the fly, reproducible from a seed.

Each image is one coloured shape on a black background, captioned
`a {color} {shape} in the {position}`. The grammar is fixed: evaluation (`ldm.evaluate`) and
other tools rely on it. Size and placement vary a little around each position's anchor.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
    "white": (255, 255, 255),
    "orange": (255, 128, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Anchors as (x, y) fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
SUPERSAMPLE = 4  # render at 4x and average down: anti-aliased edges


@dataclass(frozen=True)
class ShapeSpec:
    color: str
    shape: str
    position: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} in the {self.position}"


def all_specs() -> list[ShapeSpec]:
    """Every (color, shape, position) of the grammar: 8 x 3 x 5 = 120."""
    return [ShapeSpec(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS]


def parse_caption(caption: str) -> ShapeSpec:
    """Inverse of `ShapeSpec.caption`; raises ValueError on text outside the grammar."""
    words = caption.strip().split(" ", 3)
    if len(words) != 4 or words[0] != "a" or not words[3].startswith("in the "):
        raise ValueError(f"caption {caption!r} is not 'a <color> <shape> in the <position>'")
    spec = ShapeSpec(words[1], words[2], words[3][len("in the "):])
    if spec.color not in COLORS or spec.shape not in SHAPES or spec.position not in POSITIONS:
        raise ValueError(f"caption {caption!r} uses a word outside the shapes grammar")
    return spec


def render(spec: ShapeSpec, size: int, rng: np.random.Generator) -> np.ndarray:
    """Draw `spec` as a uint8 (size, size, 3) image; rng draws the small size/placement jitter."""
    radius = rng.uniform(0.15, 0.19)  # half the shape's extent, fraction of the side
    ax, ay = POSITIONS[spec.position]
    cx = ax + rng.uniform(-0.03, 0.03)
    cy = ay + rng.uniform(-0.03, 0.03)
    n = size * SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / n
    x, y = np.meshgrid(coords, coords)  # x: column, y: row (down)
    dx, dy = x - cx, y - cy
    if spec.shape == "circle":
        mask = dx**2 + dy**2 <= radius**2
    elif spec.shape == "square":
        half = radius * 0.9  # same area scale as the circle, roughly
        mask = (np.abs(dx) <= half) & (np.abs(dy) <= half)
    else:  # isosceles triangle, apex up, base at the bottom
        h = 2 * radius
        t = (dy + radius) / h  # 0 at the apex row, 1 at the base
        mask = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * radius)
    cover = mask.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    rgb = np.asarray(COLORS[spec.color], dtype=np.float64)
    return np.round(cover[..., None] * rgb).astype(np.uint8)


def to_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float (3, H, W) in [-1, 1], the autoencoder's input range.
    (Read-only arrays, such as np.asarray of a PIL image, are copied: torch warns when it
    shares memory it may not write.)"""
    if not image.flags.writeable:
        image = image.copy()
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1.0


class ShapesDataset(Dataset):
    """`length` items; item i is a pure function of (seed, i), so any worker reproduces it."""

    def __init__(self, size: int = 32, length: int = 100_000, seed: int = 0):
        if size < 8:
            raise ValueError(f"shapes: size must be at least 8, got {size}")
        self.size, self.length, self.seed = size, length, seed
        self.specs = all_specs()

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        spec = self.specs[rng.integers(len(self.specs))]
        return {"image": to_tensor(render(spec, self.size, rng)), "caption": spec.caption}
