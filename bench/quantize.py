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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if __package__ in (None, ""):  # run as a script: import from the project root
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.run import DEFAULT_WORK, PROMPTS  # noqa: E402

if TYPE_CHECKING:
    from ldm.modules.conditioning import Tokenizer
    from server.contract import PipelineInfo

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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; exits with a usage error when the bench repository is missing."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work-dir", type=Path, default=DEFAULT_WORK,
                   help="the bench's work folder (model_repository, export/onnx)")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: all cores)")
    p.add_argument("--repetitions", type=int, default=30)
    p.add_argument("--images", type=int, default=4, help="requests compared per variant")
    args = p.parse_args(argv)
    repo = args.work_dir / "model_repository"
    if not (repo / "manifest.json").is_file() or not (repo / "ldm_txt2img").is_dir():
        p.error(f"{args.work_dir}: no bench repository; run `python -m bench` first")
    return args


@dataclass(frozen=True)
class Served:
    """What every variant shares: the served pipeline's text encoder, VAE decoder and shapes."""

    version: Path  # the ldm_txt2img model's version folder
    info: PipelineInfo
    tokenizer: Tokenizer
    nets: dict[str, Callable[..., np.ndarray]]  # "text_encoder", "vae_decoder"
    context: tuple[int, ...]  # (tokens, width) of one prompt's context
    size: int  # image side in pixels
    latent: tuple[int, int, int]  # (channels, side, side) of one latent
    threads: int | None


def load_served(repo: Path, threads: int | None) -> Served:
    """Load the bench repository's pipeline pieces that no variant changes."""
    from ldm.modules.conditioning import open_tokenizer
    from server.contract import TOKENIZER_DIR, PipelineInfo
    from server.networks import onnx_function
    from server.repository import read_pipeline_config

    version = repo / "ldm_txt2img" / "1"
    info = PipelineInfo.load(version)
    tokenizer = open_tokenizer(version / TOKENIZER_DIR, info.max_seq_len)
    nets = {n: onnx_function(repo / info.target(n).onnx, info.target(n).inputs,
                             info.target(n).output, threads)
            for n in ("text_encoder", "vae_decoder")}
    context = nets["text_encoder"](np.zeros((1, info.max_seq_len), np.int64)).shape[1:]
    # The trained latent size: the default image size of the served model.
    size = read_pipeline_config(repo / "ldm_txt2img")[0].default_size
    side = size // info.downsample_factor
    return Served(version, info, tokenizer, nets, context, size,
                  (info.latent_channels, side, side), threads)


def variant_graph(raw: Path, served: Path, ops: list[str] | None, tmp: Path, index: int) -> Path:
    """The UNet graph of one variant: the served one, or `raw` with `ops` quantized to int8
    and then CPU-optimised like the served graph (written under tmp, named by index)."""
    if ops is None:
        return served
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from export.ort import optimize_for_cpu

    quantized = tmp / f"{index}.onnx"
    quantize_dynamic(str(raw), str(quantized), weight_type=QuantType.QInt8,
                     op_types_to_quantize=ops)
    path = tmp / f"{index}_cpu.onnx"
    optimize_for_cpu(quantized, path)
    return path


def measure_variant(served: Served, unet_path: Path, repetitions: int,
                    n_images: int) -> tuple[list[float], np.ndarray]:
    """UNet ms per call at batch 2 and 16, and the images of n_images guided requests."""
    from export.ort import make_session
    from server.contract import ALPHAS_FILE, GenerationRequest, ServingOptions
    from server.networks import host_function, onnx_function
    from server.txt2img import Txt2ImgService

    info, threads, size = served.info, served.threads, served.size
    session = make_session(unet_path, threads)
    ms = [step_ms(session, b, served.latent, served.context, repetitions) for b in (2, 16)]
    unet = onnx_function(unet_path, info.unet.inputs, info.unet.output, threads)
    encode, decode = (host_function(served.nets[n]) for n in ("text_encoder", "vae_decoder"))
    service = Txt2ImgService(info, np.load(served.version / ALPHAS_FILE), served.tokenizer,
                             encode, host_function(unet), decode, ServingOptions(preview="none"))
    # Every field set, as the service needs (the served defaults: no negative prompt, DDIM).
    images = np.concatenate([service.generate(GenerationRequest(
        prompt=PROMPTS[i % len(PROMPTS)], negative_prompt="", steps=25, guidance_scale=5.0,
        seed=i, sampler="ddim", num_images=1, height=size, width=size)).images
        for i in range(n_images)])
    return ms, images


def print_table(rows: list[tuple[str, float, float]], images: dict[str, np.ndarray],
                threads: int | None, size: int, n_images: int) -> None:
    """The markdown table: speed per variant, and its images against fp32's."""
    base = images["fp32 (served)"]
    print(f"UNet int8 dynamic quantization ({threads or 'all'} threads, {size}x{size} images, "
          f"{n_images} requests of 25 guided DDIM steps)\n")
    print("| variant | ms/call batch 2 | ms/call batch 16 | vs fp32 (16) | PSNR vs fp32 | "
          "max diff |\n|---|---:|---:|---:|---:|---:|")
    for name, ms2, ms16 in rows:
        diff = int(np.abs(images[name].astype(int) - base.astype(int)).max())
        print(f"| {name} | {ms2:.2f} | {ms16:.2f} | {ms16 / rows[0][2]:.2f}x | "
              f"{psnr(images[name], base):.1f} dB | {diff} |")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repo = args.work_dir / "model_repository"
    # The un-optimised export of the served UNet (export/repository.py caches it by key).
    key = json.loads((repo / "manifest.json").read_text())["models"]["unet"]["onnx_key"]
    raw = args.work_dir / "export" / "onnx" / f"unet-{key[:16]}" / "model.onnx"
    threads = args.threads or None
    served = load_served(repo, threads)
    rows: list[tuple[str, float, float]] = []
    images: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, ops in VARIANTS.items():
            path = variant_graph(raw, repo / served.info.unet.onnx, ops, Path(tmp), len(rows))
            ms, images[name] = measure_variant(served, path, args.repetitions, args.images)
            rows.append((name, *ms))
    print_table(rows, images, threads, served.size, args.images)
    return 0

if __name__ == "__main__":
    raise SystemExit(main())
