"""Evaluate checkpoints: `python -m ldm.evaluate {autoencoder,ldm} --checkpoint DIR`.

    python -m ldm.evaluate autoencoder --checkpoint checkpoints/demo/autoencoder
    python -m ldm.evaluate ldm --checkpoint checkpoints/demo/ldm --seeds 4 --grid grid.png

Autoencoder: PSNR and SSIM (scikit-image's implementations) of reconstructions of held-out
`shapes` images. Text-to-image: for every caption of the `shapes` grammar and several seeds,
generate and score with the pixel-statistics judge (`ldm.evaluation.judge`): accuracy per
attribute and for all three. Prints a table; `--json` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from ldm.data.shapes import ShapesDataset, all_specs
from ldm.evaluation.judge import score
from ldm.pipeline import Txt2ImgPipeline, latents_to_uint8
from ldm.pretrained import load_pretrained, read_config

# What the server uses unless a request says otherwise (server/contract.py reads these).
DEFAULT_STEPS = 10  # DDIM 10: see bench/RESULTS.md ("Steps")
DEFAULT_GUIDANCE = 1.5
DEFAULT_SAMPLER = "ddim"
HELD_OUT_SEED = 10_000  # training uses data seeds far below this


@torch.no_grad()
def evaluate_autoencoder(folder: str, n: int, size: int | None = None) -> dict:
    model = load_pretrained(folder, strict=False)
    size = size or model.cfg.ddconfig.resolution
    data = ShapesDataset(size, n, HELD_OUT_SEED)
    psnrs, ssims = [], []
    for start in range(0, n, 64):
        x = torch.stack([data[i]["image"] for i in range(start, min(n, start + 64))])
        rec = model.decode(model.encode(x).mode())
        for a, b in zip(latents_to_uint8(x), latents_to_uint8(rec), strict=True):
            psnrs.append(peak_signal_noise_ratio(a, b, data_range=255))
            ssims.append(structural_similarity(a, b, channel_axis=2, data_range=255))
    return {"images": n, "psnr_db": float(np.mean(psnrs)), "ssim": float(np.mean(ssims))}


@torch.no_grad()
def evaluate_ldm(folder: str, seeds: int, steps: int, guidance: float, sampler: str,
                 grid: str | None = None) -> dict:
    pipe = Txt2ImgPipeline(load_pretrained(folder))
    specs = all_specs()
    totals = {"color": 0, "shape": 0, "position": 0, "all": 0}
    images_by_seed = []
    t0 = time.time()
    for seed in range(seeds):
        images = pipe([s.caption for s in specs], steps=steps, guidance_scale=guidance,
                      seed=seed, sampler=sampler)
        images_by_seed.append(images)
        for spec, image in zip(specs, images, strict=True):
            for k, v in score(spec, image).items():
                totals[k] += v
    n = seeds * len(specs)
    result = {"images": n, "steps": steps, "guidance_scale": guidance, "sampler": sampler,
              "seconds": round(time.time() - t0, 1),
              **{f"acc_{k}": totals[k] / n for k in totals}}
    if grid:
        write_grid(grid, images_by_seed[0])
    return result


def write_grid(path: str, images: np.ndarray, columns: int = 15) -> None:
    from PIL import Image

    rows = [np.concatenate(list(images[i : i + columns]), axis=1)
            for i in range(0, len(images) - columns + 1, columns)]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def print_table(result: dict) -> None:
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["autoencoder", "ldm"])
    p.add_argument("--checkpoint", required=True, help="our checkpoint folder")
    p.add_argument("--images", type=int, default=512, help="autoencoder: held-out images")
    p.add_argument("--seeds", type=int, default=4, help="ldm: seeds per caption")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--grid", help="ldm: write a grid of the first seed's images here")
    p.add_argument("--json", help="write the result as JSON here")
    args = p.parse_args(argv)
    try:
        kind, _ = read_config(args.checkpoint)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    if kind != args.what:
        print(f"error: --checkpoint {args.checkpoint} is a {kind} checkpoint", file=sys.stderr)
        return 2
    if args.what == "autoencoder":
        result = evaluate_autoencoder(args.checkpoint, args.images)
    else:
        result = evaluate_ldm(args.checkpoint, args.seeds, args.steps, args.guidance_scale,
                              args.sampler, args.grid)
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
