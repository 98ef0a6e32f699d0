"""Evaluate checkpoints: `python -m ldm.evaluate {autoencoder,ldm,judge} ...`.

    python -m ldm.evaluate autoencoder --checkpoint checkpoints/demo/ldm
    python -m ldm.evaluate ldm --checkpoint checkpoints/demo/ldm --seeds 4 --grid grid.png
    # your own images:
    python -m ldm.evaluate autoencoder --checkpoint runs/emoji_ae/model --val-of runs/emoji_ae
    python -m ldm.evaluate judge --data data/emoji --train-where style=google \
        --test-where style=twitter --out runs/emoji_judge
    python -m ldm.evaluate ldm --checkpoint runs/emoji_ldm/model --data data/emoji \
        --judge runs/emoji_judge --captions 100 --seeds 2

Autoencoder: PSNR and SSIM (scikit-image), the perceptual distance it trains with and the
mean-colour error of reconstructions (ldm/evaluation/reconstruction.py): of held-out `shapes`
images by default, of an imagefolder with `--data` (`--where key=value` filters its rows,
`--images` caps their number), or of the images a training run held out with `--val-of RUN`.
An LDM checkpoint is evaluated through its first stage.

Text-to-image: on `shapes`, every caption of the grammar x seeds, scored by the
pixel-statistics judge (`ldm.evaluation.judge`). On an imagefolder (`--data` or `--val-of`),
`--captions` captions x `--seeds`, scored by a FeatureJudge (`--judge`): the category top-1
and the name top-5 of each image against its caption's metadata row.

Judge: trains a FeatureJudge (`ldm/evaluation/feature_judge.py`) on the `--train-where`
rows, reports its scores on the `--test-where` rows (real images of a style it never saw,
blurred copies, random images: the scale generated images are read against), then trains
the judge it saves on all the selected rows. Prints a table; `--json` writes the numbers.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ldm.data.shapes import ShapesDataset, all_specs
from ldm.evaluation.judge import score
from ldm.pipeline import Txt2ImgPipeline, latents_to_uint8
from ldm.pretrained import load_pretrained, read_config

# What the server uses unless a request says otherwise (server/contract.py reads these).
DEFAULT_STEPS = 10  # DDIM 10: see bench/RESULTS.md ("Steps")
DEFAULT_GUIDANCE = 1.5
DEFAULT_SAMPLER = "ddim"
HELD_OUT_SEED = 10_000  # training uses data seeds far below this


def shapes_images(n: int, size: int) -> np.ndarray:
    data = ShapesDataset(size, n, HELD_OUT_SEED)
    return latents_to_uint8(torch.stack([data[i]["image"] for i in range(n)]))


def first_stage(folder: str):
    """The autoencoder of an autoencoder checkpoint, or an LDM checkpoint's first stage."""
    kind, _ = read_config(folder)
    model = load_pretrained(folder, strict=kind == "ldm")
    return model.first_stage_model if kind == "ldm" else model


def folder_selection(args) -> tuple[object, list[int]]:
    """(the imagefolder, chosen indices) from --val-of / --data, --where and the limit."""
    from ldm.data.imagefolder import ImageFolderDataset
    from ldm.evaluation.folders import parse_where, run_split, select

    if args.val_of:
        folder, indices = run_split(args.val_of)
    else:
        folder = ImageFolderDataset(args.data, args.size, args.background)
        indices = list(range(len(folder)))
    limit = args.images if args.what == "autoencoder" else 0
    return folder, select(folder, indices, parse_where(args.where), limit)


@torch.no_grad()
def evaluate_autoencoder(args) -> dict:
    from ldm.evaluation.folders import load_images
    from ldm.evaluation.reconstruction import reconstruction_metrics

    model = first_stage(args.checkpoint)
    size = args.size or model.cfg.ddconfig.resolution
    if args.data or args.val_of:
        args.size = size
        folder, indices = folder_selection(args)
        images = load_images(folder, indices, size)
    else:
        images = shapes_images(args.images, size)
    return reconstruction_metrics(model, images)


@torch.no_grad()
def evaluate_ldm(folder: str, seeds: int, steps: int, guidance: float, sampler: str,
                 grid: str | None = None) -> dict:
    """The shapes grammar's captions x seeds, scored by the pixel-statistics judge."""
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


@torch.no_grad()
def evaluate_captions(args) -> dict:
    """--captions captions of an imagefolder x --seeds, judged by --judge."""
    from ldm.evaluation.captions import generate, judged
    from ldm.evaluation.feature_judge import FeatureJudge

    judge = FeatureJudge.load(args.judge)
    model = load_pretrained(args.checkpoint)
    folder, indices = folder_selection(args)
    rows = list({folder.rows[i]["text"]: folder.rows[i] for i in indices}.values())
    if 0 < args.captions < len(rows):
        pick = np.random.default_rng(0).choice(len(rows), args.captions, replace=False)
        rows = [rows[i] for i in sorted(pick)]
    t0 = time.time()
    images = generate(model, [r["text"] for r in rows], args.seeds, args.steps,
                      args.guidance_scale, args.sampler)
    result = {"captions": len(rows), "images": len(images), "steps": args.steps,
              "guidance_scale": args.guidance_scale, "sampler": args.sampler,
              "seconds": round(time.time() - t0, 1), **judged(judge, images, rows)}
    if args.grid:
        write_grid(args.grid, images[:min(len(images), 64)], columns=8)
    return result


def train_judge(args) -> dict:
    """Calibrate on --train-where -> --test-where, then save a judge of every selected row."""
    from ldm.data.imagefolder import ImageFolderDataset
    from ldm.evaluation.captions import FIELDS, calibrate
    from ldm.evaluation.feature_judge import FeatureJudge
    from ldm.evaluation.folders import load_images, parse_where, select

    folder = ImageFolderDataset(args.data, args.size, args.background)
    chosen = select(folder, list(range(len(folder))), parse_where(args.where), 0)
    images = load_images(folder, chosen, args.size)
    feats = FeatureJudge({}, {}).features(images)  # once: calibration and the saved judge
    position = {index: k for k, index in enumerate(chosen)}
    result: dict = {}
    if args.train_where or args.test_where:
        train = [position[i] for i in select(folder, chosen, parse_where(args.train_where), 0)]
        test = [position[i] for i in select(folder, chosen, parse_where(args.test_where), 0)]
        _, table = calibrate(feats[train], [folder.rows[chosen[k]] for k in train],
                             images[test], [folder.rows[chosen[k]] for k in test], feats[test])
        result.update({f"{variant}_{k}": v for variant, row in table.items()
                       for k, v in row.items()})
        result.update(train_images=len(train), test_images=len(test))
    rows = [folder.rows[i] for i in chosen]
    judge = FeatureJudge.train(None, {f: [r[f] for r in rows] for f in FIELDS}, features=feats)
    judge.save(args.out)
    result.update(judge=str(args.out), judge_images=len(chosen),
                  **{f"{f}_labels": len(judge.labels[f]) for f in FIELDS})
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ldm.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=["autoencoder", "ldm", "judge"])
    p.add_argument("--checkpoint", help="our checkpoint folder (autoencoder, ldm)")
    p.add_argument("--data", help="an imagefolder (metadata.jsonl) to evaluate on")
    p.add_argument("--val-of", help="a training run folder: the images it held out")
    p.add_argument("--where", action="append", default=[], help="key=value row filter")
    p.add_argument("--size", type=int, default=0, help="image side (0: the model's)")
    p.add_argument("--background", default="white", help="for transparent images")
    p.add_argument("--images", type=int, default=512, help="autoencoder: at most this many")
    p.add_argument("--captions", type=int, default=100, help="ldm on a folder: captions")
    p.add_argument("--judge", help="ldm on a folder: a judge folder (python -m ldm.evaluate "
                                   "judge)")
    p.add_argument("--train-where", action="append", default=[], help="judge: training rows")
    p.add_argument("--test-where", action="append", default=[], help="judge: test rows")
    p.add_argument("--out", help="judge: the folder to save it in")
    p.add_argument("--seeds", type=int, default=4, help="ldm: seeds per caption")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--guidance-scale", type=float, default=DEFAULT_GUIDANCE)
    p.add_argument("--sampler", default=DEFAULT_SAMPLER)
    p.add_argument("--grid", help="ldm: write a grid of the first seed's images here")
    p.add_argument("--json", help="write the result as JSON here")
    args = p.parse_args(argv)
    needs = {"autoencoder": ["checkpoint"], "ldm": ["checkpoint"], "judge": ["data", "out"]}
    missing = [f"--{k}" for k in needs[args.what] if not getattr(args, k)]
    if args.what == "ldm" and (args.data or args.val_of) and not args.judge:
        missing.append("--judge (to score images of a folder's captions)")
    if missing:
        p.error(f"{args.what} needs {', '.join(missing)}")
    if args.data and args.val_of:
        p.error("give --data or --val-of, not both")
    return args


def run(args) -> dict:
    if args.what == "judge":
        args.size = args.size or 64
        return train_judge(args)
    kind, _ = read_config(args.checkpoint)
    if args.what == "ldm" and kind != "ldm":
        raise ValueError(f"--checkpoint {args.checkpoint} is a {kind} checkpoint")
    if args.what == "autoencoder":
        return evaluate_autoencoder(args)
    if args.data or args.val_of:
        args.size = args.size or 64  # only the rows are read: the size does not matter
        return evaluate_captions(args)
    return evaluate_ldm(args.checkpoint, args.seeds, args.steps, args.guidance_scale,
                        args.sampler, args.grid)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        result = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
