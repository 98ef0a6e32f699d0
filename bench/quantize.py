"""Would int8 help? Dynamic int8 quantization of the exported UNet: step time and image change.

    python -m bench.quantize                # after `python -m bench` built build/bench
    python -m bench.quantize --work-dir DIR --threads 2 --repetitions 30

ONNX Runtime's `quantize_dynamic` stores the weights of the chosen op types as int8 and
quantizes activations per call. Variants, each then CPU-optimised like the served graph
(`export.ort.optimize_for_cpu`): fp32 (the served graph), int8 MatMul (attention and
feed-forward projections), int8 MatMul + Conv (ConvInteger). For each: UNet ms per call at
the CFG batch of 1 and of 8 requests (2 and 16 latents), and the images of 25-step guided
requests (the served loop, `server.txt2img.Txt2ImgService`) against fp32's: PSNR and the
largest pixel difference (of 255). Prints a table; measures, changes nothing.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a script: import from the project root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.run import DEFAULT_WORK, PROMPTS  # noqa: E402

VARIANTS = {"fp32 (served)": None, "int8 MatMul": ["MatMul"],
            "int8 MatMul+Conv": ["MatMul", "Conv"]}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 100.0 if mse == 0 else 10 * np.log10(255.0**2 / mse)


def step_ms(session, batch: int, latent: tuple[int, int, int], context: tuple[int, int],
            repetitions: int) -> float:
    rng = np.random.default_rng(0)
    feeds = {"latent": rng.standard_normal((batch, *latent), dtype=np.float32),
             "timestep": np.full((batch,), 500, np.int64),
             "context": rng.standard_normal((batch, *context), dtype=np.float32)}
    for _ in range(3):
        session.run(None, feeds)
    times = []
    for _ in range(repetitions):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                   help="the bench's work folder (model_repository, export/onnx)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    p.add_argument("--repetitions", type=int, default=30)
    p.add_argument("--images", type=int, default=4, help="requests compared per variant")
    args = p.parse_args(argv)

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from export.ort import make_session, optimize_for_cpu
    from ldm.modules.text_encoder import BERTTokenizer
    from server.limits import GenerationRequest
    from server.networks import onnx_function
    from server.repository import read_pipeline_config
    from server.txt2img import (
        ALPHAS_FILE,
        TOKENIZER_DIR,
        PipelineInfo,
        ServingOptions,
        Txt2ImgService,
    )

    repo = args.work_dir / "model_repository"
    if not (repo / "manifest.json").is_file() or not (repo / "ldm_txt2img").is_dir():
        p.error(f"{args.work_dir}: no bench repository; run `python -m bench` first")
    # The un-optimised export of the served UNet (export/repository.py caches it by key).
    key = json.loads((repo / "manifest.json").read_text())["models"]["unet"]["onnx_key"]
    raw = args.work_dir / "export" / "onnx" / f"unet-{key[:16]}" / "model.onnx"
    version = repo / "ldm_txt2img" / "1"
    info = PipelineInfo.load(version)
    threads = args.threads or None
    tokenizer = BERTTokenizer(version / TOKENIZER_DIR, max_length=info.max_seq_len)
    nets = {n: onnx_function(repo / getattr(info, n)["onnx"], getattr(info, n)["inputs"],
                             getattr(info, n)["output"], threads)
            for n in ("text_encoder", "vae_decoder")}
    context = nets["text_encoder"](np.zeros((1, info.max_seq_len), np.int64)).shape[1:]
    # The trained latent size: the default image size of the served model.
    size = read_pipeline_config(repo / "ldm_txt2img")[0].default_size
    side = size // info.downsample_factor
    latent = (info.latent_channels, side, side)
    rows, images = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ops in VARIANTS.items():
            path = repo / info.unet["onnx"]
            if ops is not None:
                quantized = Path(tmp) / f"{len(rows)}.onnx"
                quantize_dynamic(str(raw), str(quantized), weight_type=QuantType.QInt8,
                                 op_types_to_quantize=ops)
                path = Path(tmp) / f"{len(rows)}_cpu.onnx"
                optimize_for_cpu(quantized, path)
            session = make_session(path, threads)
            ms = [step_ms(session, b, latent, context, args.repetitions) for b in (2, 16)]
            unet = onnx_function(path, info.unet["inputs"], info.unet["output"], threads)
            service = Txt2ImgService(info, np.load(version / ALPHAS_FILE), tokenizer,
                                     nets["text_encoder"], unet, nets["vae_decoder"],
                                     ServingOptions(preview="none"))
            images[name] = np.concatenate([service.generate(GenerationRequest(
                prompt=PROMPTS[i % len(PROMPTS)], steps=25, guidance_scale=5.0, seed=i,
                height=size, width=size)).images for i in range(args.images)])
            rows.append((name, *ms))
    base = images["fp32 (served)"]
    print(f"UNet int8 dynamic quantization ({threads or 'all'} threads, {size}x{size} images, "
          f"{args.images} requests of 25 guided DDIM steps)\n")
    print("| variant | ms/call batch 2 | ms/call batch 16 | vs fp32 (16) | PSNR vs fp32 | "
          "max diff |\n|---|---:|---:|---:|---:|---:|")
    for name, ms2, ms16 in rows:
        diff = int(np.abs(images[name].astype(int) - base.astype(int)).max())
        print(f"| {name} | {ms2:.2f} | {ms16:.2f} | {ms16 / rows[0][2]:.2f}x | "
              f"{psnr(images[name], base):.1f} dB | {diff} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
