"""The served image at a (sampler, steps) against DDIM 25, through Triton, side by side.

    python -m bench.served_default --sampler ddim --steps 10

Starts Triton on the bench's repository (`bench.steps.served_repository`), then sends one
request (one prompt, one image, served defaults otherwise) per configuration per round over
HTTP, the configurations interleaved round-robin, and prints the median time per image of
each and its ratio to DDIM 25: what issue 13's demo target ("the image per request at the new
default costs <= 0.5x DDIM 25") is measured with.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.steps import DEFAULT_CHECKPOINT, DEFAULT_WORK, served_repository

REFERENCE = ("ddim", 25)


def timed(client, sampler: str, steps: int):
    from bench.run import prompt

    def run(rep: int) -> float:
        t0 = time.perf_counter()
        out = client.generate(prompt(rep, f"{sampler}.{steps}.{rep}"), sampler=sampler,
                              steps=steps, seed=rep, num_images=1)
        seconds = time.perf_counter() - t0
        if out.images.shape[0] != 1:
            raise RuntimeError(f"expected one image, got {out.images.shape}")
        return seconds
    return run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.served_default",
                                description=__doc__.split("\n")[0])
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument("--repetitions", type=int, default=20)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="0: all usable cores")
    args = p.parse_args(argv)
    from bench.report import summary
    from bench.run import Entry, round_robin
    from export.ort import usable_cores
    from server.client import Txt2ImgClient
    from server.repository import served_models
    from server.triton import TritonServer

    repo = served_repository(args.checkpoint, args.work_dir, args.threads or usable_cores())
    configs = [(args.sampler, args.steps), REFERENCE]
    with TritonServer(repo, models=served_models(repo),
                      log_path=args.work_dir / "served_default.log") as server:
        with Txt2ImgClient(server.http_url, protocol="http", timeout=600) as client:
            entries = [Entry(f"{s}:{n}", timed(client, s, n)) for s, n in configs]
            raw = round_robin(entries, args.warmup, args.repetitions, 0.1, False)
    medians = {k: summary(v)["median"] for k, v in raw.items()}
    base = medians[f"{REFERENCE[0]}:{REFERENCE[1]}"]
    print("| served request (1 image) | median ms | x DDIM 25 |\n|---|---:|---:|")
    for key, median in medians.items():
        print(f"| {key} | {median * 1e3:.1f} | {median / base:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
