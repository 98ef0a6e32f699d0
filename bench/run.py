"""Latency and throughput of our text-to-image stack against PyTorch eager and diffusers.

    python -m bench                       # demo model, full run (< 10 min on 2 cores)
    python -m bench --markdown            # the same, tables in Markdown
    python -m bench --quick               # smoke test: tiny model, 2 repetitions, 4 steps
    python bench/run.py --checkpoint checkpoints/demo/ldm --repetitions 20

One run measures every contender on the same model, prompts, DDIM steps and guidance:
a UNet step in each runtime, one request end to end in each of PyTorch eager / diffusers /
ONNX Runtime in process / Triton over HTTP, and Triton under 1, 4 and 8 concurrent clients.
Contenders are interleaved round-robin, one of each per repetition (the starting contender
rotates), so drifting background load hits them all alike; the first `--warmup` repetitions
are dropped. Writes bench/results/latest.json and prints the tables (see bench/README.md).
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import from the project root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

log = logging.getLogger("bench")

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = PROJECT_ROOT / "bench" / "results" / "latest.json"
DEFAULT_WORK = PROJECT_ROOT / "build" / "bench"
# Shapes-dataset style prompts; each use gets a unique suffix (see `prompt`).
PROMPTS = ("a red circle in the top left", "a blue square in the bottom right",
           "a green triangle in the center", "a yellow circle on the left",
           "two purple squares", "an orange triangle at the top",
           "a small white circle in the bottom left", "a large cyan square on the right")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", type=Path,
                   help="our checkpoint folder (default: checkpoints/demo/ldm if present, "
                        "else the demo architecture with random weights)")
    p.add_argument("--random-demo-architecture", action="store_true",
                   help="demo architecture (configs/shapes) with random weights")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: tiny model, 2 repetitions, 4 steps, 1 request per client")
    p.add_argument("--repetitions", type=int, help="measured repetitions (default 20; quick 2)")
    p.add_argument("--warmup", type=int, help="repetitions dropped first (default 2; quick 1)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 25; quick 4)")
    p.add_argument("--guidance-scale", type=float, default=5.0)
    p.add_argument("--threads", type=int, default=0,
                   help="intra-op threads of every runtime (0: usable cores)")
    p.add_argument("--clients", default="1,4,8", help="concurrent Triton clients per load level")
    p.add_argument("--requests-per-client", type=int,
                   help="requests each load client sends per repetition (default 2; quick 1)")
    p.add_argument("--step-calls", type=int,
                   help="UNet calls per runtime per repetition (default 5; quick 2)")
    p.add_argument("--pipeline-instances", type=int,
                   help="ldm_txt2img instances (default: what export writes, 1)")
    p.add_argument("--settle", type=float,
                   help="seconds of idle between contenders (default 0.1; quick 0)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per Triton request")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON result file")
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                   help="repository, export cache, random checkpoints, Triton log")
    p.add_argument("--markdown", action="store_true", help="print the tables as Markdown")
    p.add_argument("--render", type=Path, metavar="JSON",
                   help="only print the tables of an earlier result file, measure nothing")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"repetitions": (20, 2), "warmup": (2, 1), "steps": (25, 4),
                "requests_per_client": (2, 1), "step_calls": (5, 2), "settle": (0.1, 0.0)}
    for name, (full, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if quick else full)
    try:
        args.clients = sorted({int(c) for c in args.clients.split(",") if c.strip()})
    except ValueError:
        p.error(f"--clients {args.clients!r}: expected comma-separated integers")
    if not args.clients or min(args.clients) < 1:
        p.error("--clients needs positive integers")
    for name in ("repetitions", "steps", "requests_per_client", "step_calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.settle < 0 or args.threads < 0:
        p.error("--warmup, --settle and --threads must be >= 0")
    if args.pipeline_instances is not None and args.pipeline_instances < 1:
        p.error("--pipeline-instances must be >= 1")
    if args.checkpoint is not None and (args.quick or args.random_demo_architecture):
        p.error("--checkpoint conflicts with --quick / --random-demo-architecture")
    return args


def prompt(rep: int, salt: str) -> str:
    """A prompt from the set, made unique so that the served pipelines' prompt-embedding cache
    never hits (the empty negative prompt does, as in production)."""
    return f"{PROMPTS[rep % len(PROMPTS)]} #{salt}"


@dataclass
class Entry:
    """One contender in the round-robin: `run(rep)` does and times one unit of its work."""

    name: str  # "e2e:onnxruntime", "step:diffusers", "load:4"
    run: Callable[[int], object]


def round_robin(entries: list[Entry], warmup: int, repetitions: int, settle: float,
                progress: bool = True) -> dict[str, list]:
    """{entry name: [result of each measured repetition]}; warm-up results are dropped."""
    from tqdm import tqdm

    results: dict[str, list] = {e.name: [] for e in entries}
    for rep in tqdm(range(warmup + repetitions), desc="repetitions", unit="rep",
                    disable=not progress, file=sys.stderr):
        k = rep % len(entries)
        for entry in entries[k:] + entries[:k]:
            value = entry.run(rep)
            if rep >= warmup:
                results[entry.name].append(value)
            if settle:
                time.sleep(settle)  # let spinning thread pools go idle before the next one
    return results


def timed_call(fn: Callable[[str, int], object], check: Callable[[object], None],
               last: dict, name: str) -> Callable[[int], float]:
    """Times one request; keeps its image in `last[name]` (every contender's last image is of
    the same prompt and seed, for `agreement`)."""
    def run(rep: int) -> float:
        t0 = time.perf_counter()
        out = fn(prompt(rep, str(rep)), rep)
        seconds = time.perf_counter() - t0
        check(out)
        last[name] = out
        return seconds
    return run


def psnr(a, b) -> float:
    """PSNR in dB of two uint8 image arrays, capped at 100 (identical: 100)."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return 100.0 if mse == 0 else min(100.0, 10 * math.log10(255.0**2 / mse))


def timed_steps(fn: Callable[[], object], calls: int) -> Callable[[int], float]:
    def run(rep: int) -> float:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        return (time.perf_counter() - t0) / calls
    return run


def image_check(size: int) -> Callable[[object], None]:
    import numpy as np

    def check(images) -> None:
        a = np.asarray(images)
        if a.shape != (1, size, size, 3) or a.dtype != np.uint8:
            raise RuntimeError(f"expected one ({size}, {size}, 3) uint8 image, got "
                               f"{a.shape} {a.dtype}")
    return check


@dataclass
class Setup:
    """Everything measured, built before the round-robin (bench/contenders.py)."""

    source: object  # bench.models.ModelSource
    model: object  # LatentDiffusion, EMA weights applied
    folder: Path  # its checkpoint folder
    repository: Path
    image_size: int
    threads: int
    params: dict
    peak: dict  # bench.flops.gemm_peaks
    generators: dict[str, Callable[[str, int], object]]  # in-process end-to-end contenders
    steps: dict[str, Callable[[], object]]
    flops: dict[str, tuple[int, dict]]
    variants: dict[str, Path]  # "openvino_fp32" -> its served repository (bench/repositories.py)


def prepare(args) -> Setup:
    """1. the model, its Triton repository and its diffusers twin; 2. the GEMM peaks of every
    runtime and the UNet's FLOPs; the in-process contenders."""
    import torch

    from bench import contenders as C
    from bench.flops import count_flops, gemm_peaks
    from bench.models import diffusers_twin, load_source, param_counts, resolve_source
    from bench.report import peaks_text
    from bench.repositories import RUNTIMES, build_served_repository, openvino_variants
    from export.ort import usable_cores

    threads = args.threads or usable_cores()
    torch.set_num_threads(threads)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    source = resolve_source(args.checkpoint, args.random_demo_architecture, args.quick)
    log.info("model: %s", source.describe())
    model, folder = load_source(source, args.work_dir)
    cfg = model.config
    image_size = cfg.latent_size * model.first_stage_model.downsample_factor
    repository = build_served_repository(args, folder, threads)
    variants = openvino_variants(repository, threads, args.pipeline_instances or 1)
    twin = diffusers_twin(cfg, float(model.scale_factor))
    params = param_counts(model, twin)
    for part, c in params.items():
        log.info("parameters %s: ours %s, diffusers %s", part, f"{c['ours']:,}",
                 f"{c['diffusers']:,}")
        if abs(c["diffusers"] - c["ours"]) > 0.05 * c["ours"]:
            log.warning("%s: the diffusers twin differs by more than 5%% in size", part)

    peak = gemm_peaks(threads, n=512 if args.quick else 2048, tries=2 if args.quick else 5)
    log.info("%s (%d threads, n=%d)", peaks_text(peak), threads, peak["n"])
    latent = (cfg.unet.in_channels, cfg.latent_size, cfg.latent_size)
    local = {name: C.LocalService(repository, threads, args.steps, args.guidance_scale,
                                  image_size, *RUNTIMES[name])
             for name in ("onnxruntime_fp32", *variants)}
    generators = {
        "pytorch_eager": C.EagerPipeline(model, args.steps, args.guidance_scale),
        "diffusers": C.DiffusersLoop(twin, model.cond_stage_model.tknz_fn.tokenizer, latent,
                                     args.steps, args.guidance_scale),
        "onnxruntime": local.pop("onnxruntime_fp32"), **local,
    }
    steps = C.step_functions(model, twin, generators, cfg)
    flops = {name: count_flops(steps[name]) for name in ("pytorch_eager", "diffusers")}
    for name in ("onnxruntime", *variants):  # the same graph, exported
        flops[name] = flops["pytorch_eager"]
    return Setup(source, model, folder, repository, image_size, threads, params, peak,
                 generators, steps, flops, variants)


def measure(args, setup: Setup) -> tuple[dict[str, list], dict, int]:
    """3. start Triton, run every contender round-robin, stop Triton:
    (raw results by entry name, last image of each end-to-end contender, pipeline instances)."""
    from bench import contenders as C
    from bench.load import burst, pipeline_unet_stats
    from bench.repositories import pipeline_instances
    from server.repository import served_models
    from server.triton import TritonServer

    # What `python -m server` loads: the pipeline models (they run the networks themselves).
    repos = {"triton_http": setup.repository,
             **{f"triton_http_{k}": v for k, v in setup.variants.items()}}
    servers = {name: TritonServer(repo, log_path=args.work_dir / f"{name}.log",
                                  models=served_models(repo)) for name, repo in repos.items()}
    server, clients = servers["triton_http"], {}
    try:
        for name, s in servers.items():
            t0 = time.perf_counter()
            s.start(timeout=300)
            log.info("%s: tritonserver ready in %.1f s (log %s)", name,
                     time.perf_counter() - t0, s.log_path)
            clients[name] = C.TritonHttp(s.http_url, args.steps, args.guidance_scale,
                                         args.timeout)
        check, last = image_check(setup.image_size), {}
        entries = [Entry(f"step:{name}", timed_steps(fn, args.step_calls))
                   for name, fn in setup.steps.items()]
        entries += [Entry(f"e2e:{name}", timed_call(fn, check, last, name))
                    for name, fn in {**setup.generators, **clients}.items()]

        def load_level(n: int) -> Callable[[int], object]:
            def run(rep: int):
                def request(i: int, j: int) -> dict:
                    return {"prompt": prompt(rep + i + j, f"{rep}.{n}.{i}.{j}"),
                            "negative_prompt": C.NEGATIVE_PROMPT, "steps": args.steps,
                            "guidance_scale": args.guidance_scale, "seed": rep * 1000 + i,
                            "sampler": "ddim", "num_images": 1}
                before = pipeline_unet_stats(server.http_url, server.metrics_url)
                b = burst(server.http_url, n, args.requests_per_client, request, args.timeout)
                b.unet = pipeline_unet_stats(server.http_url, server.metrics_url) - before
                return b
            return run

        entries += [Entry(f"load:{n}", load_level(n)) for n in args.clients]
        raw = round_robin(entries, args.warmup, args.repetitions, args.settle)
        return raw, last, pipeline_instances(setup.repository)
    finally:
        for client in clients.values():
            client.close()
        for s in servers.values():
            s.stop()


def assemble(args, setup: Setup, raw: dict[str, list], last: dict, instances: int) -> dict:
    """4. summaries, agreement and targets: the JSON result."""
    from bench.flops import torch_matmul_peak
    from bench.load import load_summary
    from bench.models import config_summary
    from bench.report import summary, targets
    from bench.results_io import cpu_name, versions
    from export.ort import usable_cores

    e2e = {k.split(":", 1)[1]: summary(v) for k, v in raw.items() if k.startswith("e2e:")}
    unet_step = {}
    for name, (total, by_op) in setup.flops.items():
        unet_step[name] = {**summary(raw[f"step:{name}"]), "flops": total, "flops_by_op": by_op,
                           "precision": "bf16" if name.endswith("bf16") else "fp32"}
    load = {n: load_summary(raw[f"load:{n}"], args.requests_per_client) for n in args.clients}
    # Same weights, prompt and seed: the served paths must draw what PyTorch draws (the
    # diffusers twin has its own random weights, so it is not compared).
    agreement = {f"{name}_vs_pytorch_eager_psnr_db": psnr(last[name], last["pytorch_eager"])
                 for name in last if name not in ("pytorch_eager", "diffusers")}
    return {
        "meta": {
            "model": setup.source.describe(), "checkpoint": str(setup.folder),
            "config": config_summary(setup.model.config), "image_size": setup.image_size,
            "steps": args.steps, "sampler": "ddim", "guidance_scale": args.guidance_scale,
            "repetitions": args.repetitions, "warmup": args.warmup,
            "requests_per_client": args.requests_per_client, "step_calls": args.step_calls,
            "clients": args.clients, "pipeline_instances": instances, "threads": setup.threads,
            "cores": usable_cores(), "cpu": cpu_name(), "quick": args.quick,
            "versions": versions(), "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
        "params": setup.params,
        "gemm_peaks": setup.peak,
        "matmul_peak": torch_matmul_peak(setup.peak),  # the torch-only peak older readers use
        "unet_step": unet_step,
        "e2e": e2e,
        "load": {str(n): v for n, v in load.items()},
        "agreement": agreement,
        "targets": [{"name": t.name, **t.to_dict()} for t in targets(e2e, load)],
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from bench.report import render
    from bench.results_io import write_json

    if args.render is not None:
        print(render(json.loads(args.render.read_text()), args.markdown))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("export", "server", "ldm", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    t_start = time.perf_counter()
    try:
        setup = prepare(args)
        raw, last, instances = measure(args, setup)
    except (FileNotFoundError, TimeoutError) as e:  # no tritonserver, no checkpoint, ...
        print(f"bench: error: {e}", file=sys.stderr)
        return 1
    result = assemble(args, setup, raw, last, instances)
    result["meta"]["seconds"] = time.perf_counter() - t_start
    write_json(result, args.out)
    print(render(result, args.markdown))
    print(f"\nwrote {args.out} ({result['meta']['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
