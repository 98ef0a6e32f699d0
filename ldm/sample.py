"""Sample images in process: `python -m ldm.sample --checkpoint DIR --prompt TEXT -o out.png`.

    python -m ldm.sample --checkpoint checkpoints/demo/ldm --prompt "a red circle in the top left" \
        --num-images 4 --steps 25 --guidance-scale 3 --sampler ddim --seed 0 -o outputs/demo.png
    python -m ldm.sample --checkpoint runs/emoji_ldm/model --prompt "grinning face" \
        --prompt "red apple" --prompts-file more.txt -o outputs/grid.png

Loads our checkpoint folder (or a CompVis YAML + .ckpt with --compvis-config), runs the
PyTorch pipeline (`ldm.pipeline.Txt2ImgPipeline`) and writes one row per prompt (`--prompt`
repeated, and/or `--prompts-file` with one per line), `--num-images` per row. Steps, guidance
and sampler left out are the checkpoint's own defaults (`sampling:` in its config.yaml, see
ldm.pack), else DDIM 25 at guidance 3.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from ldm.compat import load_compvis
from ldm.pipeline import Txt2ImgPipeline
from ldm.pretrained import read_sampling
from ldm.samplers import SAMPLERS

FALLBACKS = {"steps": 25, "guidance_scale": 3.0, "sampler": "ddim"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.sample", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="our checkpoint folder or a CompVis .ckpt")
    p.add_argument("--compvis-config", help="CompVis YAML for a .ckpt")
    p.add_argument("--prompt", action="append", default=[], help="repeatable: one row each")
    p.add_argument("--prompts-file", type=Path, help="more prompts, one per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--steps", type=int, help="default: the checkpoint's, else 25")
    p.add_argument("--guidance-scale", type=float, help="default: the checkpoint's, else 3")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), help="default: the checkpoint's, "
                                                                "else ddim")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=4, help="nearest-neighbour upscale of the PNG")
    p.add_argument("-o", "--out", default="outputs/sample.png")
    args = p.parse_args(argv)
    try:
        apply_sampling_defaults(args)
    except ValueError as e:
        p.error(f"--checkpoint {args.checkpoint}: {e}")
    if args.num_images < 1 or args.steps < 1:
        p.error(f"--num-images and --steps must be >= 1 (got {args.num_images}, {args.steps})")
    prompts = list(args.prompt)
    if args.prompts_file is not None:
        if not args.prompts_file.is_file():
            p.error(f"--prompts-file {args.prompts_file}: no such file")
        prompts += [line.strip() for line in args.prompts_file.read_text().splitlines()
                    if line.strip()]
    if not prompts:
        p.error("give at least one --prompt (or a --prompts-file)")
    try:
        model = load_compvis(args.compvis_config, args.checkpoint)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"error: --checkpoint {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    bar = tqdm(total=None, desc="sampling", unit="step")

    def progress(i: int, total: int, x, x0) -> None:
        bar.total = total * len(prompts)
        bar.update(1)

    pipe = Txt2ImgPipeline(model)
    rows = [np.concatenate(list(pipe([prompt] * args.num_images, args.negative_prompt,
                                     args.steps, args.guidance_scale, args.seed, args.sampler,
                                     callback=progress)), axis=1)
            for prompt in prompts]
    bar.close()
    strip = Image.fromarray(np.concatenate(rows, axis=0))
    strip = strip.resize((strip.width * args.scale, strip.height * args.scale), Image.NEAREST)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    strip.save(args.out)
    print(f"wrote {args.out} ({len(prompts)} prompt(s) x {args.num_images} image(s), "
          f"seed {args.seed}; {args.sampler}, {args.steps} steps, "
          f"guidance {args.guidance_scale:g})")
    return 0


def apply_sampling_defaults(args: argparse.Namespace) -> None:
    """Fill --steps/--guidance-scale/--sampler left out from our checkpoint folder's
    `sampling:`, else the fallbacks."""
    own = read_sampling(args.checkpoint)
    for key, fallback in FALLBACKS.items():
        if getattr(args, key) is None:
            setattr(args, key, own.get(key, fallback))


if __name__ == "__main__":
    sys.exit(main())
