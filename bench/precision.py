"""Does bf16 draw the right images? Judged accuracy and PSNR of the served loop per runtime.

    python -m bench.precision                       # demo model, 120 captions x 4 seeds
    python -m bench.precision --seeds 1 --runtimes onnxruntime_fp32,openvino_bf16

For each runtime (ONNX Runtime fp32, OpenVINO fp32, OpenVINO bf16), every caption of the
`shapes` grammar x `--seeds` seeds goes through `server.txt2img.Txt2ImgService` over that
runtime's networks (the served loop, served defaults: DDIM 25, guidance 1.5), and the
pixel-statistics judge scores each image (as `python -m ldm.evaluate ldm`). Images of the
same caption and seed are compared across runtimes (PSNR against ONNX Runtime fp32).

The rule (issue 13): bf16 may be the serving default only if its accuracy stays within 1
point (0.01) of fp32's on every attribute (color, shape, position, all three).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bench.repositories import RUNTIMES
from bench.run import psnr
from bench.steps import DEFAULT_CHECKPOINT, DEFAULT_WORK, served_repository
from ldm.evaluate import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS

ATTRIBUTES = ("color", "shape", "position", "all")
TOLERANCE = 0.01  # one point of accuracy
CLIENTS = 8  # concurrent requests: their UNet steps share batches, as served


def make_service(repository: Path, runtime: str, threads: int):
    """The served loop over `runtime`'s networks, with the served pipeline's batcher."""
    from server.batching import CallBatcher
    from server.contract import ServingOptions
    from server.networks import local_service

    networks, precision = RUNTIMES[runtime]
    options = ServingOptions(networks=networks, precision=precision, preview="none")
    return local_service(repository, options, threads, CallBatcher(0.01))


def generate_all(service, captions: list[str], seeds: int, size: int) -> np.ndarray:
    """(seeds, captions, H, W, 3) uint8: one request per caption and seed."""
    from server.contract import GenerationRequest

    def one(job: tuple[int, int]) -> np.ndarray:
        seed, i = job
        req = GenerationRequest(prompt=captions[i], negative_prompt="", steps=DEFAULT_STEPS,
                                guidance_scale=DEFAULT_GUIDANCE, seed=1000 * seed + i,
                                sampler=DEFAULT_SAMPLER, num_images=1, height=size, width=size)
        return service.generate(req).images[0]

    jobs = [(s, i) for s in range(seeds) for i in range(len(captions))]
    with ThreadPoolExecutor(CLIENTS) as pool:
        images = list(pool.map(one, jobs))
    return np.stack(images).reshape(seeds, len(captions), *images[0].shape)


def judged(images: np.ndarray, specs: list) -> dict[str, float]:
    """Accuracy per attribute of (seeds, captions, ...) images of `specs`' captions."""
    from ldm.evaluation.judge import score

    totals = dict.fromkeys(ATTRIBUTES, 0)
    for per_seed in images:
        for spec, image in zip(specs, per_seed, strict=True):
            for k, v in score(spec, image).items():
                totals[k] += v
    n = images.shape[0] * images.shape[1]
    return {k: totals[k] / n for k in ATTRIBUTES}


def verdict(results: dict[str, dict]) -> str:
    """Whether bf16 meets the rule against OpenVINO fp32 (else ONNX Runtime fp32)."""
    if "openvino_bf16" not in results:
        return "bf16 not measured"
    base = results.get("openvino_fp32") or results["onnxruntime_fp32"]
    gaps = {k: base["accuracy"][k] - results["openvino_bf16"]["accuracy"][k]
            for k in ATTRIBUTES}
    worst = max(gaps, key=gaps.get)
    ok = all(g <= TOLERANCE + 1e-9 for g in gaps.values())
    return (f"bf16 {'meets' if ok else 'misses'} the rule: largest drop {gaps[worst]:+.4f} "
            f"({worst}), allowed {TOLERANCE}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.precision",
                                description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--captions", type=int, default=0, help="the first N captions (0: all 120)")
    p.add_argument("--runtimes", default=",".join(RUNTIMES))
    p.add_argument("--threads", type=int, default=0, help="0: all usable cores")
    p.add_argument("--out", type=Path, default=Path("bench/results/precision.json"))
    args = p.parse_args(argv)
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    bad = [r for r in runtimes if r not in RUNTIMES]
    if bad or "onnxruntime_fp32" not in runtimes:
        p.error(f"--runtimes {args.runtimes!r}: from {list(RUNTIMES)}, onnxruntime_fp32 included")
    from export.ort import usable_cores
    from ldm.data.shapes import all_specs
    from ldm.pretrained import read_config

    threads = args.threads or usable_cores()
    repo = served_repository(args.checkpoint, args.work_dir, threads)
    _, cfg = read_config(args.checkpoint)
    size = cfg.latent_size * 2 ** (len(cfg.first_stage.ddconfig.ch_mult) - 1)
    specs = all_specs()[:args.captions or None]
    images, results = {}, {}
    for name in runtimes:
        images[name] = generate_all(make_service(repo, name, threads),
                                    [s.caption for s in specs], args.seeds, size)
        results[name] = {"accuracy": judged(images[name], specs),
                         "psnr_vs_onnxruntime_fp32": psnr(images[name],
                                                          images["onnxruntime_fp32"])}
    print(table(results, args.seeds * len(specs)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seeds": args.seeds, "results": results,
                                    "verdict": verdict(results)}, indent=1))
    return 0


def table(results: dict[str, dict], n: int) -> str:
    lines = [f"Judged accuracy of the served loop ({n} images each; DDIM {DEFAULT_STEPS}, "
             f"guidance {DEFAULT_GUIDANCE})", "",
             "| runtime | color | shape | position | all three | PSNR vs ORT fp32 dB |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        a = r["accuracy"]
        lines.append(f"| {name} | {a['color']:.4f} | {a['shape']:.4f} | {a['position']:.4f} "
                     f"| {a['all']:.4f} | {r['psnr_vs_onnxruntime_fp32']:.1f} |")
    return "\n".join(lines + ["", verdict(results)])


if __name__ == "__main__":
    sys.exit(main())
