"""Text-to-image on a caption set, judged by a FeatureJudge, and the judge's own calibration.

- `generate`: images for each caption x seed with the in-process pipeline;
- `judged`: the judge's category top-1 and name top-5 against each caption's metadata row;
- `calibrate`: what the judge scores on real images of a style it was not trained on, on
  blurred copies and on random images: the scale a generated image's score is read against.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageFilter

from ldm.evaluation.feature_judge import FeatureJudge
from ldm.pipeline import Txt2ImgPipeline

FIELDS = {"category": 1, "name": 5}  # label field -> the k of its top-k accuracy


def generate(model, captions: list[str], seeds: int, steps: int, guidance: float,
             sampler: str, batch: int = 32) -> np.ndarray:
    """uint8 (seeds x len(captions), H, W, 3), seed-major: seed s's images come as a block."""
    pipe = Txt2ImgPipeline(model)
    out = []
    for seed in range(seeds):
        for start in range(0, len(captions), batch):
            out.append(pipe(captions[start:start + batch], steps=steps, guidance_scale=guidance,
                            seed=seed * 100_003 + start, sampler=sampler))
    return np.concatenate(out)


def judged(judge: FeatureJudge, images: np.ndarray | None, rows: list[dict],
           feats: torch.Tensor | None = None) -> dict[str, float]:
    """{"category_top1", "name_top5"} of `images` (or their `feats`) against `rows`
    (repeated to their number)."""
    feats = judge.features(images) if feats is None else feats
    rows = [rows[i % len(rows)] for i in range(len(feats))]
    return {f"{field}_top{k}": judge.accuracy(None, field, [r[field] for r in rows], k, feats)
            for field, k in FIELDS.items() if field in judge.labels}


def blurred(images: np.ndarray, radius: float = 2.0) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(radius)))
                     for im in images])


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def calibrate(train_feats: torch.Tensor, train_rows: list[dict], test_images: np.ndarray,
              test_rows: list[dict],
              test_feats: torch.Tensor) -> tuple[FeatureJudge, dict[str, dict[str, float]]]:
    """A judge trained on one set's features, and its scores on another set: its real images
    (`test_feats`), blurred copies and random images."""
    judge = FeatureJudge.train(None, {f: [r[f] for r in train_rows] for f in FIELDS},
                               features=train_feats)
    size = test_images.shape[1]
    table = {"real": judged(judge, None, test_rows, test_feats),
             "blurred": judged(judge, blurred(test_images), test_rows),
             "random": judged(judge, random_images(len(test_images), size), test_rows)}
    return judge, table
