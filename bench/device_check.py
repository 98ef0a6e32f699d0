"""The prepared GPU check: one script, one table, for a lent GPU machine (issue 15).

    python bench/device_check.py                       # on the GPU: ~3-6 min on an H200
    python bench/device_check.py --device cpu --quick  # what the tests run here

It needs PyTorch and our `ldm` package importable, nothing else of ours installed:
`bench/device_payload.py` prepares the few wheels and the BERT vocabulary it needs (under
`build/device`, carried to the machine). Rows:

1. the demo model's images through the served loop (server/txt2img.py with `networks: torch`,
   server/torch_networks.py: the device-resident loop the GPU pipeline model runs) in fp16
   and bf16 on the device against fp32 on the CPU: PSNR, judged accuracy (all three
   attributes, `ldm.evaluation.judge`), non-finite values in the decoded images (a NaN turns
   black in uint8, so it is counted before);
2. the demo VAE decoder under fp16 autocast on large latents (128x128, 512 px at f=4) against
   fp32 on the device: non-finite values and PSNR (why the served VAE stays fp32);
3. that served loop's images per second at batches 1, 8 and 32 (precision auto: fp16 on a
   GPU, DDIM 10);
4. the paper-scale UNet (configs/compvis/txt2img-1p4B-eval.yaml, random weights) one guided
   step at batch 2 on 32x32 latents in fp16 and bf16, with its counted FLOPs against the
   device's measured matmul peak in the same precision.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a file on a machine where nothing of ours is installed
    sys.path.insert(0, str(ROOT))

from bench.flops import count_flops  # noqa: E402
from bench.run import psnr  # noqa: E402
from ldm.data.shapes import all_specs  # noqa: E402
from ldm.evaluation.judge import score  # noqa: E402
from ldm.pipeline import latents_to_uint8  # noqa: E402
from ldm.pretrained import load_pretrained  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PAPER = ROOT / "configs" / "compvis" / "txt2img-1p4B-eval.yaml"


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=DTYPES[precision], enabled=precision != "fp32")


def served_loop(checkpoint: Path, device: torch.device, precision: str):
    """The served loop on the demo model's PyTorch modules (`networks: torch`: text encoder and
    UNet in `precision`, VAE fp32), with a count of non-finite decoded values (a NaN turns
    black in uint8, so it is counted before)."""
    from server.torch_networks import model_service

    service = model_service(load_pretrained(checkpoint).eval(), device, precision)
    decode, service.nonfinite = service.decode_fn, 0

    def counted(z: torch.Tensor) -> torch.Tensor:
        image = decode(z)
        service.nonfinite += int((~torch.isfinite(image)).sum())
        return image

    service.decode_fn = counted
    return service


def request(prompt: str, seed: int, steps: int, images: int = 1):
    from server.contract import GenerationRequest

    return GenerationRequest(prompt=prompt, negative_prompt="", steps=steps, guidance_scale=1.5,
                             seed=seed, sampler="ddim", num_images=images, height=32, width=32)


def demo_images(checkpoint: Path, device, precision: str, captions: list[str], seeds: int,
                steps: int) -> tuple[np.ndarray, int]:
    """(images of every caption x seed, non-finite values seen) through the served loop."""
    service = served_loop(checkpoint, device, precision)
    images = [service.generate(request(c, seed, steps)).images
              for seed in range(seeds) for c in captions]
    return np.concatenate(images), service.nonfinite


def accuracy(images: np.ndarray, specs, seeds: int) -> float:
    """Fraction of images whose color, shape and position all match their caption."""
    expected = [s for _ in range(seeds) for s in specs]  # demo_images' order
    return float(np.mean([all(score(s, im).values()) for s, im in zip(expected, images,
                                                                       strict=True)]))


def image_rows(device, args) -> list[tuple[str, str]]:
    specs = all_specs()[:args.captions]
    captions = [s.caption for s in specs]
    reference, _ = demo_images(args.checkpoint, torch.device("cpu"), "fp32", captions,
                               args.seeds, args.steps)
    rows = [("demo images, served loop, CPU fp32 (reference)",
             f"all-three accuracy {accuracy(reference, specs, args.seeds):.3f}, "
             f"{len(reference)} images")]
    for precision in ("fp16", "bf16"):
        images, bad = demo_images(args.checkpoint, device, precision, captions, args.seeds,
                                  args.steps)
        rows.append((f"demo images, served loop (networks: torch), {device.type} {precision}",
                     f"PSNR {psnr(images, reference):.1f} dB vs CPU fp32, all-three accuracy "
                     f"{accuracy(images, specs, args.seeds):.3f}, non-finite values {bad}"))
    return rows


@torch.no_grad()
def vae_row(model, device, side: int) -> tuple[str, str]:
    model = model.to(device)
    z = torch.randn(1, model.config.unet.in_channels, side, side, device=device,
                    generator=torch.Generator(device).manual_seed(0))
    want = model.decode_first_stage(z).float()
    with autocast(device, "fp16"):
        got = model.decode_first_stage(z).float()
    bad = int((~torch.isfinite(got)).sum())
    value = psnr(latents_to_uint8(got), latents_to_uint8(want))
    return (f"demo VAE decoder, {side}x{side} latents, {device.type} fp16 autocast",
            f"non-finite values {bad}, PSNR {value:.1f} dB vs fp32")


def throughput_rows(device, args) -> list[tuple[str, str]]:
    """Images per second of one request of `batch` images (a guided UNet batch of 2 x batch)
    through the served loop on the device: latents and context never leave it."""
    service = served_loop(args.checkpoint, device, "auto")  # fp16 on a GPU
    caption = all_specs()[0].caption
    rows = []
    for batch in args.batches:
        seconds = []
        for rep in range(args.repetitions + 1):  # the first is warm-up
            _sync(device)
            t0 = time.perf_counter()
            service.generate(request(caption, rep, 10, batch))
            _sync(device)
            seconds.append(time.perf_counter() - t0)
        rows.append((f"demo served loop (networks: torch), batch {batch}, {device.type} "
                     f"precision auto, DDIM 10",
                     f"{batch / float(np.median(seconds[1:])):.1f} images/s"))
    return rows


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_seconds(fn, device, tries: int) -> float:
    fn()
    best = float("inf")
    for _ in range(tries):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def matmul_peak(device, precision: str, n: int) -> float:
    """Best GFLOP/s of an (n, n) @ (n, n) product in `precision` on `device`."""
    a, b = (torch.randn(n, n, device=device, dtype=DTYPES[precision]) for _ in range(2))
    return 2 * n**3 / _best_seconds(lambda: a @ b, device, 5) / 1e9


@torch.no_grad()
def paper_unet_rows(device, args) -> list[tuple[str, str]]:
    import yaml

    from ldm.compat import ldm_config
    from ldm.modules.unet import UNetModel

    cfg = ldm_config(yaml.safe_load(PAPER.read_text())["model"])
    if args.quick:  # the CPU test: the paper's layout at a tenth of its width
        cfg.unet.model_channels, cfg.unet.context_dim = 64, 128
    unet = UNetModel(cfg.unet).to(device).eval()
    side, ctx = cfg.latent_size, cfg.unet.context_dim
    x = torch.randn(2, cfg.unet.in_channels, side, side, device=device)
    t = torch.tensor([500, 500], device=device)
    c = torch.randn(2, 77, ctx, device=device)
    flops, _ = count_flops(lambda: unet(x, t, context=c))
    rows = []
    for precision in ("fp16", "bf16"):
        with autocast(device, precision):
            step = _best_seconds(lambda: unet(x, t, context=c), device, args.repetitions)
        peak = matmul_peak(device, precision, args.matmul_n)
        rows.append((f"paper UNet step, batch 2, {side}x{side}, {device.type} {precision}",
                     f"{step * 1e3:.1f} ms, {flops / 1e9:.0f} GFLOP, "
                     f"{flops / step / 1e9 / peak:.0%} of the {peak:.0f} GFLOP/s matmul peak"))
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/device_check.py", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--checkpoint", type=Path, default=ROOT / "checkpoints" / "demo" / "ldm")
    p.add_argument("--captions", type=int, default=120, help="of the shapes grammar's 120")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=10, help="DDIM steps of the judged images")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--repetitions", type=int, default=5)
    p.add_argument("--vae-latent", type=int, default=128)
    p.add_argument("--matmul-n", type=int, default=8192)
    p.add_argument("--quick", action="store_true",
                   help="a few images, small batches, a narrow paper UNet: the CPU test")
    args = p.parse_args(argv)
    args.batches = [int(b) for b in args.batches.split(",")]
    if args.quick:
        args.captions, args.seeds, args.steps, args.batches = 3, 1, 2, [1, 2]
        args.repetitions, args.vae_latent, args.matmul_n = 1, 16, 256
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    rows = [*image_rows(device, args),
            vae_row(load_pretrained(args.checkpoint).eval(), device, args.vae_latent),
            *throughput_rows(device, args), *paper_unet_rows(device, args)]
    print(f"Device check on {name} (torch {torch.__version__}, numpy {np.__version__}, "
          f"Python {sys.version.split()[0]}), {time.perf_counter() - t0:.0f} s\n")
    print("| check | result |\n|---|---|")
    for check, result in rows:
        print(f"| {check} | {result} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
