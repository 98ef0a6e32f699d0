"""The paper-scale model on every CPU runtime here: one UNet step and one image end to end.

    python -m bench.scale                 # first: the checkpoint and its repository
    python -m bench.scale_runtimes        # then: ~25 min on 2 cores

On the 1.45 B model that `python -m bench.scale` wrote under build/scale (its checkpoint and
exported repository), for PyTorch eager, ONNX Runtime fp32, OpenVINO fp32 and OpenVINO bf16:
- the UNet step at batch 2 (one guided step on 32x32x4 latents), with its counted FLOPs
  against the GEMM peak of its precision (bench.flops.gemm_peaks: the best any runtime here
  reaches);
- one 256x256 image, 50 DDIM steps, guidance 5, in process (ldm.pipeline for eager,
  server.txt2img.Txt2ImgService over the repository's graphs for the others);
- the same image served: Triton with the pipeline's networks on that runtime, over gRPC, and
  the served UNet step as the pipeline's own counters measure it;
- PSNR of every image against the ONNX Runtime fp32 one (bf16 against fp32 at this scale).
Each measurement runs in a process of its own (one 6 GB model resident at a time).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench.repositories import RUNTIMES
from bench.run import psnr

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a painting of a lighthouse on a cliff at sunset"
PIPELINE = ("ldm_txt2img", "ldm_txt2img_stream")


def _request(args):
    from server.contract import GenerationRequest

    return GenerationRequest(prompt=PROMPT, negative_prompt="", steps=args.steps,
                             guidance_scale=5.0, seed=0, sampler="ddim", num_images=1,
                             height=args.size, width=args.size)


def _median_s(fn, repeats: int = 3) -> float:
    fn()  # warm-up: first-call allocations, OpenVINO's shape compilation
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def stage_eager(args) -> dict:
    """PyTorch eager: the UNet step and the image, from the checkpoint."""
    import torch

    from ldm.compat import load_compvis
    from ldm.pipeline import Txt2ImgPipeline

    torch.set_num_threads(args.threads)
    model = load_compvis(args.config, args.checkpoint)
    h = args.size // 8
    x = torch.randn(2, 4, h, h, generator=torch.Generator().manual_seed(0))
    t, c = torch.tensor([500, 500]), model.get_learned_conditioning([PROMPT, ""])
    with torch.no_grad():
        step = _median_s(lambda: model.apply_model(x, t, c))
    t0 = time.perf_counter()
    image = Txt2ImgPipeline(model)([PROMPT], steps=args.steps, guidance_scale=5.0, seed=0,
                                   sampler="ddim", height=args.size, width=args.size)
    np.save(args.work / "runtimes_eager.npy", image)
    return {"unet_step_s": step, "image_s": time.perf_counter() - t0}


def stage_local(args) -> dict:
    """One runtime in process: its networks under the served loop (Txt2ImgService)."""
    from server.contract import ServingOptions
    from server.networks import local_service

    networks, precision = RUNTIMES[args.runtime]
    options = ServingOptions(networks=networks, precision=precision, preview="none",
                             openvino_cache=str(args.work / "openvino-cache"))
    t0 = time.perf_counter()
    service = local_service(args.repository, options, args.threads)
    load_s = time.perf_counter() - t0
    info, rng = service.info, np.random.default_rng(0)
    h, (seq, dim) = args.size // 8, _context_shape(service.encode_fn, info)
    feeds = (torch.from_numpy(rng.standard_normal((2, info.latent_channels, h, h),
                                                  dtype=np.float32)),
             torch.tensor([500, 500], dtype=torch.int64),
             torch.from_numpy(rng.standard_normal((2, seq, dim), dtype=np.float32)))
    step = _median_s(lambda: service.unet_fn(*feeds))
    t0 = time.perf_counter()
    image = service.generate(_request(args)).images
    np.save(args.work / f"runtimes_{args.runtime}.npy", image)
    return {"load_s": load_s, "unet_step_s": step, "image_s": time.perf_counter() - t0}


def _context_shape(encode, info) -> tuple[int, int]:
    return tuple(encode(torch.zeros((1, info.max_seq_len), dtype=torch.int64)).shape[1:])


def stage_served(args) -> dict:
    """One runtime behind Triton: the pipeline models with their networks on it."""
    from server.batching import parse_network_metrics
    from server.client import Txt2ImgClient
    from server.repository import PipelineOptions, assemble
    from server.triton import TritonServer

    networks, precision = RUNTIMES[args.runtime]
    assemble(args.repository, PipelineOptions(serving={
        "networks": networks, "precision": precision, "intra_op_threads": args.threads,
        "openvino_cache": str(args.work / "openvino-cache")}))
    t0 = time.perf_counter()
    with TritonServer(args.repository, models=PIPELINE, log_path=args.work / "triton.log") as s:
        ready_s = time.perf_counter() - t0
        request = _request(args).model_dump(exclude={"prompt"})
        with Txt2ImgClient(s.grpc_url, timeout=7200) as client:
            t1 = time.perf_counter()
            image = client.generate(PROMPT, **request).images
            image_s = time.perf_counter() - t1
        import httpx

        counters = parse_network_metrics(httpx.get(s.metrics_url).text)
    unet = {k: v for (_, net), c in counters.items() if net == "unet" for k, v in c.items()}
    np.save(args.work / f"runtimes_served_{args.runtime}.npy", image)
    return {"ready_s": ready_s, "image_s": image_s,
            "unet_step_s": unet["ldm_network_compute_us_total"] / 1e6
            / unet["ldm_network_executions_total"]}


def stage_peaks(args) -> dict:
    from bench.flops import count_flops, gemm_peaks

    return {"peaks": gemm_peaks(args.threads), "unet_flops": _unet_flops(args, count_flops)}


def _unet_flops(args, count_flops) -> int:
    """FLOPs of one guided UNet step (batch 2), counted on the model without its weights."""
    import torch
    import yaml

    from ldm.checkpoints import empty_weights
    from ldm.compat import ldm_config
    from ldm.models.diffusion import LatentDiffusion

    with empty_weights():
        model = LatentDiffusion(ldm_config(yaml.safe_load(args.config.read_text())["model"]))
    model = model.to_empty(device="meta")
    h = args.size // 8
    x, t = torch.zeros(2, 4, h, h, device="meta"), torch.tensor([500, 500], device="meta")
    c = torch.zeros(2, 77, model.config.unet.context_dim, device="meta")
    with torch.no_grad():
        return count_flops(lambda: model.apply_model(x, t, c))[0]


STAGES = {"eager": stage_eager, "local": stage_local, "served": stage_served,
          "peaks": stage_peaks}


def run_stage(args, name: str, runtime: str = "") -> dict:
    tag = f"{name}_{runtime}" if runtime else name
    out = args.work / f"runtimes_{tag}.json"
    cmd = [sys.executable, "-m", "bench.scale_runtimes", "--stage", name, "--runtime",
           runtime or "onnxruntime_fp32", "--work", str(args.work), "--steps", str(args.steps),
           "--size", str(args.size), "--threads", str(args.threads), "--config",
           str(args.config)]
    print(f"[{time.strftime('%H:%M:%S')}] {tag}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())


# --- report --------------------------------------------------------------------------------

def targets(r: dict) -> list[tuple[str, float, str, bool]]:
    """(what, measured, target, met) of the issue's paper-scale targets."""
    served, peaks = r["served"], r["peaks"]["peaks"]
    bf16, fp32 = served["openvino_bf16"], served["onnxruntime_fp32"]
    bf16_peak = (peaks.get("bf16") or {}).get("gflops") or float("nan")
    achieved = r["peaks"]["unet_flops"] / bf16["unet_step_s"] / 1e9
    rows = [("served bf16 UNet step / ORT fp32 step", bf16["unet_step_s"] / fp32["unet_step_s"],
             "<= 0.55"),
            ("served bf16 UNet step, % of bf16 GEMM peak", 100 * achieved / bf16_peak, ">= 75"),
            ("served bf16 image / PyTorch eager image", bf16["image_s"] / r["eager"]["image_s"],
             "<= 0.35"),
            ("served bf16 image / ORT fp32 served image", bf16["image_s"] / fp32["image_s"],
             "<= 0.6")]
    return [(w, v, t, v <= float(t[3:]) if t.startswith("<=") else v >= float(t[3:]))
            for w, v, t in rows]


def report(r: dict) -> str:
    peaks, flops = r["peaks"]["peaks"], r["peaks"]["unet_flops"]
    lines = [f"UNet step: batch 2 (guided), {r['size'] // 8}x{r['size'] // 8}x4 latents, "
             f"{flops / 1e9:.0f} GFLOP; images {r['size']}x{r['size']}, {r['steps']} DDIM "
             f"steps, guidance 5; {r['threads']} threads. GEMM peaks: fp32 "
             f"{peaks['fp32']['gflops']:.0f} GFLOP/s ({peaks['fp32']['runtime']}), bf16 "
             + (f"{peaks['bf16']['gflops']:.0f} GFLOP/s ({peaks['bf16']['runtime']})"
                if peaks.get("bf16") else "none") + ".", "",
             "| runtime | UNet step s | served step s | % of its peak | image s | served "
             "image s | PSNR vs ORT fp32 |", "|---|---:|---:|---:|---:|---:|---:|"]
    e = r["eager"]
    lines.append(f"| PyTorch eager | {e['unet_step_s']:.2f} | | "
                 f"{_pct(flops, e['unet_step_s'], peaks['fp32']):.0f} | {e['image_s']:.0f} | "
                 f"| {r['psnr']['eager']:.1f} |")
    for name in RUNTIMES:
        loc, srv = r["local"][name], r["served"][name]
        peak = peaks["bf16"] if name.endswith("bf16") else peaks["fp32"]
        lines.append(f"| {name} | {loc['unet_step_s']:.2f} | {srv['unet_step_s']:.2f} | "
                     f"{_pct(flops, srv['unet_step_s'], peak):.0f} | {loc['image_s']:.0f} | "
                     f"{srv['image_s']:.0f} | {r['psnr'][name]:.1f} (served "
                     f"{r['psnr']['served_' + name]:.1f}) |")
    lines += ["", "| target | measured | want | met |", "|---|---:|---:|---|"]
    lines += [f"| {w} | {v:.2f} | {t} | {'yes' if ok else 'NO'} |" for w, v, t, ok in targets(r)]
    return "\n".join(lines)


def _pct(flops: int, seconds: float, peak: dict | None) -> float:
    return 100 * flops / seconds / 1e9 / peak["gflops"] if peak else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale_runtimes",
                                description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path,
                   default=ROOT / "configs" / "compvis" / "txt2img-1p4B-eval.yaml")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "scale",
                   help="where python -m bench.scale wrote the checkpoint and repository")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--runtime", choices=sorted(RUNTIMES), help=argparse.SUPPRESS)
    from bench.scale import trial_paths

    return trial_paths(p.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:  # a child: one stage, its result as JSON
        tag = args.stage if args.stage in ("eager", "peaks") else f"{args.stage}_{args.runtime}"
        result = STAGES[args.stage](args)
        (args.work / f"runtimes_{tag}.json").write_text(json.dumps(result))
        return 0
    if not (args.repository / "manifest.json").is_file():
        print(f"bench.scale_runtimes: no repository in {args.work}: run python -m bench.scale "
              "first", file=sys.stderr)
        return 1
    r = {"steps": args.steps, "size": args.size, "threads": args.threads,
         "peaks": run_stage(args, "peaks"), "eager": run_stage(args, "eager"),
         "local": {n: run_stage(args, "local", n) for n in RUNTIMES},
         "served": {n: run_stage(args, "served", n) for n in RUNTIMES}}
    base = np.load(args.work / "runtimes_onnxruntime_fp32.npy")
    r["psnr"] = {"eager": psnr(np.load(args.work / "runtimes_eager.npy"), base)}
    for name in RUNTIMES:
        r["psnr"][name] = psnr(np.load(args.work / f"runtimes_{name}.npy"), base)
        r["psnr"]["served_" + name] = psnr(np.load(args.work / f"runtimes_served_{name}.npy"),
                                           base)
    (args.work / "runtimes.json").write_text(json.dumps(r, indent=1, default=str))
    print(report(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
