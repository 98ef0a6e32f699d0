"""Export a LatentDiffusion checkpoint and write the Triton model repository.

    python export/build_engines.py --checkpoint runs/shapes_ldm/model --backend python
    python -m export.build_engines --checkpoint model.ckpt --compvis-config txt2img.yaml \\
        --backend tensorrt --out model_repository

Exports text_encoder, unet, vae_decoder and vae_encoder to ONNX (EMA weights when the
checkpoint has them), checks each against PyTorch, then writes `--out` for the chosen Triton
backend (see export/repository.py for the steps and caches). Reruns rebuild only what changed;
`--force` rebuilds everything.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script: import from the project root, not from export/ (where our
    # tensorrt.py would shadow the real `tensorrt` package).
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from export.triton_config import BACKENDS, DEVICES  # noqa: E402 - light, no torch

MODELS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
ORT_LEVELS = ("auto", "extended", "all")
OPENVINO_PRECISIONS = ("fp32", "bf16", "auto")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="build_engines", description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="our checkpoint folder, or a CompVis .ckpt (with --compvis-config)")
    p.add_argument("--compvis-config", type=Path, help="CompVis YAML config of a .ckpt")
    p.add_argument("--unsafe-allow-pickle", action="store_true",
                   help="allow a .ckpt with pickled objects (only for files you trust)")
    p.add_argument("--out", type=Path, default=Path("model_repository"))
    p.add_argument("--backend", default="python", help=f"one of {', '.join(BACKENDS)}")
    p.add_argument("--device", default="cpu", help="onnxruntime backend instances: cpu or gpu")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset")
    p.add_argument("--max-batch", type=int, default=0,
                   help="images per batch (0: 8 up to 256 px at f=8, fewer for larger images)")
    p.add_argument("--min-latent", type=int, default=0, help="0: the trained size")
    p.add_argument("--max-latent", type=int, default=0, help="0: the trained size")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--no-ema", action="store_true", help="export the training weights")
    p.add_argument("--ort-level", default="auto", help=f"one of {', '.join(ORT_LEVELS)}")
    p.add_argument("--parity-tol", type=float, default=1e-4, help="max relative error")
    p.add_argument("--instances", type=int, default=1, help="Triton instances per model")
    p.add_argument("--threads", type=int, default=0, help="intra-op threads (0: cores)")
    p.add_argument("--max-queue-delay-us", type=int, default=2000)
    p.add_argument("--openvino-precision", default="fp32",
                   help="--backend openvino: fp32, bf16 or auto (bf16 where the CPU has it)")
    p.add_argument("--openvino-parity", default="",
                   help="comma-separated precisions to check the served graphs at on OpenVINO "
                        "(for a pipeline that runs them there)")
    p.add_argument("--name-prefix", default="",
                   help="before each network's Triton model name (emoji_ -> emoji_unet): "
                        "several models' repositories in one Triton")
    p.add_argument("--torch-weights", action="store_true",
                   help="also write the networks' PyTorch weights (pytorch/), for a pipeline "
                        "that runs the modules themselves (--networks torch)")
    p.add_argument("--work-dir", type=Path, default=Path("build/export"),
                   help="cache of ONNX files and engines")
    p.add_argument("--force", action="store_true", help="rebuild everything")
    p.add_argument("--replace", action="store_true",
                   help="rebuild --out even though it was built from another checkpoint")
    p.add_argument("--keep-builds", type=int, default=2,
                   help="cached builds kept per model; older ones are removed (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    _check_choices(p, args)
    _check_paths(p, args)
    return args


def _check_choices(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Each choice-valued flag: one of its values, or an error naming it."""
    def choice(flag: str, value: str, allowed) -> None:
        if value not in allowed:
            p.error(f"{flag} {value!r} is not one of: {', '.join(allowed)}")

    choice("--backend", args.backend, BACKENDS)
    choice("--device", args.device, DEVICES)
    choice("--ort-level", args.ort_level, ORT_LEVELS)
    choice("--openvino-precision", args.openvino_precision, OPENVINO_PRECISIONS)
    args.openvino_parity = tuple(x.strip() for x in args.openvino_parity.split(",") if x.strip())
    for x in args.openvino_parity:
        choice("--openvino-parity entry", x, OPENVINO_PRECISIONS)
    if args.openvino_precision != "fp32" and args.backend != "openvino":
        p.error(f"--openvino-precision {args.openvino_precision} needs --backend openvino")
    args.models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    for m in args.models:
        choice("--models entry", m, MODELS)


def _check_paths(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.checkpoint.exists():
        p.error(f"--checkpoint {args.checkpoint}: no such file or folder")
    if args.compvis_config is not None and not args.compvis_config.is_file():
        p.error(f"--compvis-config {args.compvis_config}: no such file")
    if args.checkpoint.is_file() and args.compvis_config is None:
        p.error(f"--checkpoint {args.checkpoint} is a file: a CompVis .ckpt needs "
                "--compvis-config")
    if args.max_batch < 0:
        p.error(f"--max-batch {args.max_batch}: must be >= 1 (or 0: chosen by image size)")
    if args.keep_builds < 1:
        p.error(f"--keep-builds {args.keep_builds}: must be >= 1")
    if args.checkpoint.is_dir() and not (args.checkpoint / "config.yaml").is_file():
        p.error(f"--checkpoint {args.checkpoint}: no config.yaml (not one of our checkpoints)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    from export.parity import ParityError
    from export.repository import BuildOptions, build_repository
    from export.specs import ShapeLimits
    from export.triton_config import TritonOptions

    try:
        options = BuildOptions(
            triton=TritonOptions(args.backend, args.device, args.instances,
                                 args.max_queue_delay_us, args.threads,
                                 args.openvino_precision, name_prefix=args.name_prefix),
            models=args.models,
            limits=ShapeLimits(args.max_batch, args.min_latent, args.max_latent),
            opset=args.opset, use_ema=not args.no_ema, ort_level=args.ort_level,
            parity_tol=args.parity_tol, openvino_parity=args.openvino_parity,
            torch_weights=args.torch_weights)
        report = build_repository(args.checkpoint, args.out, options, args.compvis_config,
                                  args.unsafe_allow_pickle, args.work_dir, args.force,
                                  progress=not args.quiet, replace=args.replace,
                                  keep=args.keep_builds)
    except (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
            ParityError, ImportError) as e:
        print(f"build_engines: error: {e}", file=sys.stderr)
        return 1
    for note in report.notes:
        print(note)
    if report.weights:
        print({"ema": "exported the UNet's EMA weights (model_ema)",
               "training": "exported the training weights (no EMA in the checkpoint, or "
                           "--no-ema)"}.get(report.weights, f"weights: {report.weights}"))
    for name, parity in report.parity.items():
        print(f"parity {name}: max abs {parity['max_abs']:.2e}, max rel {parity['max_rel']:.2e} "
              f"(relative = max|onnx - torch| / max|torch|, tol {parity['tol']:g})")
    if report.up_to_date:
        print(f"{args.out}: up to date, nothing rebuilt ({report.seconds:.1f} s)")
    else:
        print("rebuilt:\n  " + "\n  ".join(report.rebuilt))
        if report.reused:
            print("reused:\n  " + "\n  ".join(report.reused))
        print(f"wrote {args.out} (backend {report.backend}) in {report.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
