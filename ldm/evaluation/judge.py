"""A pixel-statistics judge for `shapes` images: which color, shape and position it shows.

No learned model: color is the nearest palette entry to the mean of the bright pixels,
position the nearest anchor to the shape's centroid, and shape the fill ratio of the mask in
its bounding box (square ~1.0, others below) and, between circle and triangle, the width of
the top third of the shape against its bottom third (circle ~1, apex-up triangle ~0.2).
"""
from __future__ import annotations

import numpy as np

from ldm.data.shapes import COLORS, POSITIONS, ShapeSpec

PALETTE = np.array(list(COLORS.values()), dtype=np.float64)
ANCHORS = np.array(list(POSITIONS.values()), dtype=np.float64)
MASK_LEVEL = 128  # every palette color has a 255 channel: half coverage is 128
SQUARE_MIN_FILL = 0.92  # squares fill >= 0.96 of their box, circles <= 0.88 (at 32 px)
TRIANGLE_MAX_TAPER = 0.6


def judge(image: np.ndarray) -> ShapeSpec | None:
    """uint8 (H, W, 3) -> the spec it depicts, or None when no shape is visible."""
    img = image.astype(np.float64)
    brightness = img.max(axis=2)
    mask = brightness >= MASK_LEVEL
    if mask.sum() < 3:
        return None
    color = list(COLORS)[int(np.argmin(((PALETTE - img[mask].mean(0)) ** 2).sum(1)))]
    h, w = mask.shape
    ys, xs = np.nonzero(mask)
    centroid = np.array([(xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h])
    position = list(POSITIONS)[int(np.argmin(((ANCHORS - centroid) ** 2).sum(1)))]
    top, bottom = ys.min(), ys.max() + 1
    fill = mask.sum() / ((xs.max() - xs.min() + 1) * (bottom - top))
    if fill >= SQUARE_MIN_FILL:
        shape = "square"
    else:
        rows = mask[top:bottom].sum(axis=1).astype(np.float64)
        third = max(1, len(rows) // 3)
        taper = rows[:third].mean() / max(rows[-third:].mean(), 1e-9)
        shape = "triangle" if taper < TRIANGLE_MAX_TAPER else "circle"
    return ShapeSpec(color, shape, position)


def score(expected: ShapeSpec, image: np.ndarray) -> dict[str, bool]:
    """Per-attribute correctness of one image."""
    got = judge(image)
    if got is None:
        return {"color": False, "shape": False, "position": False, "all": False}
    ok = {"color": got.color == expected.color, "shape": got.shape == expected.shape,
          "position": got.position == expected.position}
    ok["all"] = all(ok.values())
    return ok
