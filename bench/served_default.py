"""The served image at a (sampler, steps) against DDIM 25, through Triton, side by side.

    python -m bench.served_default --sampler ddim --steps 10

Starts Triton on the bench's repository (`bench.steps.served_repository`, networks on ONNX
Runtime: the serving default before issue 13) and on a copy whose pipeline runs them on
OpenVINO at bf16 (fp32 where the CPU has no bf16: the default now), then sends one request
(one prompt, one image, served defaults otherwise) per configuration per round over HTTP, the
configurations interleaved round-robin, and prints the median time per image of each and its
ratio to ONNX Runtime at DDIM 25: what issue 13's demo target ("the image per request at the
new default costs <= 0.5x DDIM 25") is measured with.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from bench.steps import DEFAULT_CHECKPOINT, DEFAULT_WORK, REFERENCE, served_repository


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

    threads = args.threads or usable_cores()
    repos = runtime_repositories(served_repository(args.checkpoint, args.work_dir, threads),
                                 threads)
    configs = [(rt, s, n) for rt in repos for s, n in dict.fromkeys(
        [(args.sampler, args.steps), REFERENCE])]
    with contextlib.ExitStack() as stack:
        clients = {rt: stack.enter_context(served_client(repo, args.work_dir / f"{rt}.log"))
                   for rt, repo in repos.items()}
        entries = [Entry(f"{rt} {s}:{n}", timed(clients[rt], s, n)) for rt, s, n in configs]
        raw = round_robin(entries, args.warmup, args.repetitions, 0.1, False)
    medians = {k: summary(v)["median"] for k, v in raw.items()}
    base = medians[f"onnxruntime {REFERENCE[0]}:{REFERENCE[1]}"]
    print("| networks | served request (1 image) | median ms | x ONNX Runtime DDIM 25 |\n"
          "|---|---|---:|---:|")
    for key, median in medians.items():
        runtime, config = key.split(" ")
        print(f"| {runtime} | {config} | {median * 1e3:.1f} | {median / base:.2f}x |")
    return 0


def runtime_repositories(repo: Path, threads: int) -> dict[str, Path]:
    """{"onnxruntime": the bench repository (the serving default before issue 13),
    "openvino_bf16" (or "openvino_fp32" where the CPU has no bf16): the default now}."""
    from bench.repositories import openvino_variants

    variants = openvino_variants(repo, threads, instances=1)
    best = "openvino_bf16" if "openvino_bf16" in variants else "openvino_fp32"
    return {"onnxruntime": repo, best: variants[best]}


@contextlib.contextmanager
def served_client(repo: Path, log_path: Path):
    """An HTTP client of a Triton server (free ports) on `repo`."""
    from server.client import Txt2ImgClient
    from server.repository import served_models
    from server.triton import TritonServer

    with TritonServer(repo, models=served_models(repo), log_path=log_path) as server, \
            Txt2ImgClient(server.http_url, protocol="http", timeout=600) as client:
        yield client


if __name__ == "__main__":
    sys.exit(main())
