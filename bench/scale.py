"""The paper-scale trial: a CompVis release-style checkpoint of the 1.45 B txt2img model (or of
Stable Diffusion v1, `--config configs/compvis/v1-inference.yaml`, at 512x512), loaded,
exported and served in one command, with the memory and time of every stage.

    python -m bench.scale                       # ~15 GB of disk under build/scale, 20-30 min
    python -m bench.scale --steps 10 --networks onnxruntime
    python -m bench.scale --config configs/compvis/v1-inference.yaml --work build/scale_sd

1. make: the architecture of configs/compvis/txt2img-1p4B-eval.yaml with random weights in
   which no tensor is all zeros (CompVis zero-initialises output layers, which would make
   every parity check vacuous), written as PyTorch Lightning 1.4 wrote the CompVis releases
   (`callbacks` keyed by the ModelCheckpoint class); reused while the config is unchanged;
2. load: `load_compvis` in a fresh process: peak RSS against the checkpoint's tensor bytes
   (target <= 1.25x);
3. in process: one 256x256 image (DDIM, guidance 5) with PyTorch, and the eager UNet step at
   batch 2 with its counted FLOPs;
4. export: `python -m export.build_engines` in a child process: peak RSS against the
   model's fp32 weight bytes (target <= 1.5x);
5. serve: `python -m server --checkpoint ... --compvis-config ...` (the server's default
   networks, OpenVINO at bf16 where the CPU has it; `--networks onnxruntime` for fp32); RSS
   of every process (launcher + gateway, tritonserver, each stub) after load and under 4
   concurrent requests (target <= 1.3x the networks' fp32 weight bytes); one image over HTTP
   and one over gRPC streaming, each compared with the in-process image (PSNR, >= 40 dB);
6. the ONNX Runtime UNet step at batch 2 on the served graph, and the GEMM peaks of every
   runtime (`bench.flops`) measured in the same process.
Each stage runs in its own process, so each peak is that stage's alone.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.procmem import process_rss, status_bytes
from bench.scale_report import report
from server.contract import NETWORK_MODES, PRECISIONS

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "compvis" / "txt2img-1p4B-eval.yaml"
PROMPT = "a painting of a lighthouse on a cliff at sunset"


# --- stage 1: the checkpoint ---------------------------------------------------------------

def make_checkpoint(config: Path, path: Path) -> dict:
    """Random non-zero weights of `config`'s architecture, in the Lightning 1.4 layout."""
    import hashlib

    import torch
    import yaml

    from ldm.checkpoints import save_lightning_checkpoint, tensor_bytes
    from ldm.compat import POSITION_IDS, ldm_config
    from ldm.models.diffusion import LatentDiffusion
    from ldm.modules.clip_text import FrozenCLIPEmbedder

    stamp = path.with_suffix(".json")
    key = hashlib.sha256(config.read_bytes()).hexdigest()
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
        return json.loads(stamp.read_text())
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = LatentDiffusion(ldm_config(yaml.safe_load(config.read_text())["model"]))
    state = model.state_dict()
    if isinstance(model.cond_stage_model, FrozenCLIPEmbedder):  # SD v1: as its files are
        state[POSITION_IDS] = torch.arange(77)[None]
    with torch.no_grad():
        for t in state.values():
            if t.is_floating_point() and not t.any():
                # Zero-initialised layers (outputs, biases): small noise, scaled by fan-in.
                fan_in = t[0].numel() if t.dim() > 1 else 1
                t.normal_(0, 0.02 if t.dim() == 1 else 0.5 / fan_in**0.5)
    zero = [k for k, t in state.items() if t.is_floating_point() and not t.any()]
    assert not zero, zero
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_lightning_checkpoint(tmp, state, layout="1.4", global_step=470000)
    os.replace(tmp, path)
    info = {"key": key, "parameters": sum(t.numel() for t in state.values()),
            "tensor_bytes": tensor_bytes(state),
            "file_bytes": path.stat().st_size, "make_s": time.perf_counter() - t0}
    stamp.write_text(json.dumps(info))
    return info


# --- stages run in their own process -------------------------------------------------------

def stage_load(args) -> dict:
    from ldm.checkpoints import read_checkpoint, tensor_bytes
    from ldm.compat import load_compvis

    nbytes = tensor_bytes(read_checkpoint(args.checkpoint))
    t0 = time.perf_counter()
    model = load_compvis(args.config, args.checkpoint)
    seconds = time.perf_counter() - t0
    nets = {"text_encoder": model.cond_stage_model, "unet": model.model,
            "vae_decoder": model.first_stage_model.decoder}
    net_bytes = sum(p.numel() * 4 for m in nets.values() for p in m.parameters())
    net_bytes += sum(p.numel() * 4 for p in model.first_stage_model.post_quant_conv.parameters())
    return {"load_s": seconds, "peak_rss": status_bytes("self", "VmHWM"),
            "ckpt_tensor_bytes": nbytes, "network_fp32_bytes": net_bytes,
            "model_fp32_bytes": sum(p.numel() * 4 for p in model.parameters())}


def stage_inproc(args) -> dict:
    import torch

    from bench.flops import count_flops
    from ldm.compat import load_compvis
    from ldm.pipeline import Txt2ImgPipeline

    torch.set_num_threads(args.threads)
    model = load_compvis(args.config, args.checkpoint)
    t0 = time.perf_counter()
    image = Txt2ImgPipeline(model)([PROMPT], steps=args.steps, guidance_scale=5.0, seed=0,
                                   sampler="ddim", height=args.size, width=args.size)
    image_s = time.perf_counter() - t0
    np.save(args.out_image, image)
    h = args.size // 8
    x = torch.randn(2, 4, h, h, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    c = model.get_learned_conditioning([PROMPT, ""])
    with torch.no_grad():
        flops, _ = count_flops(lambda: model.apply_model(x, t, c))
        times = []
        for _ in range(3):
            t1 = time.perf_counter()
            model.apply_model(x, t, c)
            times.append(time.perf_counter() - t1)
    return {"image_s": image_s, "unet_step_s": float(np.median(times)), "unet_flops": flops,
            "peak_rss": status_bytes("self", "VmHWM")}


def stage_ort_step(args) -> dict:
    """The served UNet graph at batch 2 on ONNX Runtime, and the GEMM peaks of every runtime
    (bench.flops.gemm_peaks) measured in the same process."""
    from bench.flops import gemm_peaks
    from export.ort import make_session

    session = make_session(args.repository / "unet" / "1" / "model.onnx", args.threads)
    h = args.size // 8
    rng = np.random.default_rng(0)
    shapes = {i.name: i.shape for i in session.get_inputs()}
    c, (seq, dim) = shapes["latent"][1], shapes["context"][1:]
    feeds = {"latent": rng.standard_normal((2, c, h, h), dtype=np.float32),
             "timestep": np.array([500, 500], dtype=np.int64),
             "context": rng.standard_normal((2, seq, dim), dtype=np.float32)}
    session.run(None, feeds)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    del session
    return {"ort_unet_step_s": float(np.median(times)), "peaks": gemm_peaks(args.threads)}


STAGES = {"load": stage_load, "inproc": stage_inproc, "ort_step": stage_ort_step}


def run_stage(name: str, args, extra: list[str] = ()) -> dict:
    out = args.work / f"{name}.json"
    cmd = [sys.executable, "-m", "bench.scale", "--stage", name, "--work", str(args.work),
           "--steps", str(args.steps), "--size", str(args.size), "--threads", str(args.threads),
           "--config", str(args.config), *extra]
    print(f"[{time.strftime('%H:%M:%S')}] stage {name}", flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.read_text())


# --- export and serve ----------------------------------------------------------------------

def timed_child(cmd: list[str]) -> tuple[int, float, int]:
    """(exit code, seconds, peak RSS bytes of the child) via wait4's rusage."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - t0, usage.ru_maxrss * 1024


def export(args) -> dict:
    print(f"[{time.strftime('%H:%M:%S')}] export", flush=True)
    code, seconds, peak = timed_child([
        sys.executable, "-m", "export.build_engines", "--checkpoint", str(args.checkpoint),
        "--compvis-config", str(args.config), "--out", str(args.repository),
        "--work-dir", str(args.work / "export"), "--replace"])
    if code != 0:
        raise SystemExit(f"export failed (exit {code})")
    return {"export_s": seconds, "peak_rss": peak}


def serve(args, reference: np.ndarray) -> dict:
    from bench.served import start_server
    from server.client import Txt2ImgClient

    t0 = time.perf_counter()
    served = start_server(["--checkpoint", str(args.checkpoint), "--compvis-config",
                           str(args.config), "--repository", str(args.repository),
                           "--work-dir", str(args.work / "export"), "--request-timeout", "3600",
                           *runtime_flags(args)], timeout=1800)
    try:
        out = {"ready_s": time.perf_counter() - t0, "networks": served_networks(args)}
        time.sleep(3)
        out["rss_after_load"] = process_rss(served.proc.pid)
        kw = dict(steps=args.steps, guidance_scale=5.0, seed=0, sampler="ddim",
                  height=args.size, width=args.size)
        with Txt2ImgClient(served.triton_http, protocol="http", timeout=3600) as c:
            t1 = time.perf_counter()
            out["http_image"] = c.generate(PROMPT, **kw).images
            out["http_s"] = time.perf_counter() - t1
        with Txt2ImgClient(served.triton_grpc, timeout=3600) as c:
            t1 = time.perf_counter()
            out["grpc_stream_image"] = c.stream(PROMPT, **kw).images
            out["grpc_stream_s"] = time.perf_counter() - t1
        out["rss_under_load"], out["load_4_s"] = _under_load(served.proc.pid,
                                                             served.triton_grpc, args)
    finally:
        served.stop()
    for key in ("http_image", "grpc_stream_image"):
        out[key.replace("image", "psnr")] = psnr(out.pop(key), reference)
    return out


def runtime_flags(args) -> list[str]:
    """The launcher's --networks/--precision where given (else the server's defaults)."""
    return [f for k in ("networks", "precision") if getattr(args, k)
            for f in (f"--{k}", getattr(args, k))]


def served_networks(args) -> str:
    """How the served pipeline runs its networks, as its config says ("openvino auto")."""
    from server.repository import read_pipeline_config

    serving = read_pipeline_config(args.repository / "ldm_txt2img_stream")[1]
    return serving.networks + (f" {serving.precision}" if serving.networks == "openvino" else "")


def _under_load(root: int, grpc: str, args) -> tuple[dict[str, int], float]:
    """Peak total RSS (and its per-process split) while 4 clients generate at once."""
    from server.client import Txt2ImgClient

    errors: list[Exception] = []

    def one(seed: int) -> None:
        try:
            with Txt2ImgClient(grpc, timeout=3600) as c:
                c.generate(PROMPT, steps=args.load_steps, seed=seed, height=args.size,
                           width=args.size)
        except Exception as e:  # noqa: BLE001 - reported
            errors.append(e)

    threads = [threading.Thread(target=one, args=(s,)) for s in range(4)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    peak: dict[str, int] = {}
    while any(t.is_alive() for t in threads):
        now = process_rss(root)
        if sum(now.values()) > sum(peak.values()):
            peak = now
        time.sleep(0.5)
    if errors:
        raise SystemExit(f"concurrent requests failed: {errors[0]}")
    return peak, time.perf_counter() - t0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# --- report --------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, default=CONFIG, help="CompVis LDM YAML")
    p.add_argument("--work", type=Path, default=ROOT / "build" / "scale",
                   help="checkpoint, repository and export cache (~15 GB)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps of the compared images")
    p.add_argument("--load-steps", type=int, default=5, help="steps of the 4 concurrent requests")
    p.add_argument("--size", type=int, default=0,
                   help="image side, pixels (default: the config's, 256 or SD's 512)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--networks", choices=NETWORK_MODES,
                   help="how the served pipeline runs the networks (default: the server's)")
    p.add_argument("--precision", choices=PRECISIONS, help="of --networks openvino")
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = trial_paths(p.parse_args(argv))
    args.out_image = args.work / "inproc.npy"
    args.size = args.size or trained_size(args.config)
    return args


def trained_size(config: Path) -> int:
    """The image side a CompVis config was trained at: latent side x the autoencoder's f."""
    import yaml

    from ldm.compat import ldm_config

    cfg = ldm_config(yaml.safe_load(config.read_text())["model"])
    return cfg.latent_size * 2 ** (len(cfg.first_stage.ddconfig.ch_mult) - 1)


def trial_paths(args: argparse.Namespace) -> argparse.Namespace:
    """The trial's files under `args.work`: the checkpoint and its repository."""
    args.work = args.work.resolve()
    args.checkpoint = args.work / "model.ckpt"
    args.repository = args.work / "model_repository"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.stage:  # a child: one stage, its result as JSON
        result = STAGES[args.stage](args)
        (args.work / f"{args.stage}.json").write_text(json.dumps(result))
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"[{time.strftime('%H:%M:%S')}] make {args.checkpoint}", flush=True)
    results = {"steps": args.steps, "size": args.size, "threads": args.threads,
               "load_steps": args.load_steps,
               "checkpoint": make_checkpoint(args.config, args.checkpoint)}
    results["load"] = run_stage("load", args)
    results["inproc"] = run_stage("inproc", args)
    results["export"] = export(args)
    results["serve"] = serve(args, np.load(args.out_image))
    results["ort_step"] = run_stage("ort_step", args)
    (args.work / "results.json").write_text(json.dumps(results, indent=1))
    print(report(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
