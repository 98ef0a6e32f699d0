"""The served repositories the bench starts Triton on: the python-backend repository of the
model (its pipeline runs the graphs on ONNX Runtime in process), and copies of it whose
pipeline runs the same graphs on OpenVINO at fp32 and at bf16 (where the CPU has bf16)."""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

log = logging.getLogger("bench")

# The in-process runtimes the benchmarks compare: name -> (ServingOptions networks, precision).
RUNTIMES: dict[str, tuple[str, str]] = {"onnxruntime_fp32": ("onnxruntime", "fp32"),
                                        "openvino_fp32": ("openvino", "fp32"),
                                        "openvino_bf16": ("openvino", "bf16")}


def build_served_repository(args, folder: Path, threads: int):
    """The python-backend Triton repository of `folder` (cached in the work dir)."""
    from export.repository import BuildOptions, build_repository
    from export.specs import ShapeLimits
    from export.triton_config import TritonOptions

    # Room for every load client's guided steps in one UNet batch.
    limits = ShapeLimits(max_batch=max(8, max(args.clients)))
    out = args.work_dir / "model_repository"
    options = BuildOptions(models=("text_encoder", "unet", "vae_decoder"), limits=limits,
                           triton=TritonOptions(backend="python", threads=threads))
    report = build_repository(folder, out, options, work_dir=args.work_dir / "export",
                              progress=False)
    log.info("repository %s: %s", out, "up to date" if report.up_to_date
             else "rebuilt " + ", ".join(report.rebuilt))
    # Rewritten on every run, so an earlier run's --pipeline-instances never lingers in the
    # cached repository.
    from server.repository import PipelineOptions, assemble

    # The in-process networks get the same thread count as every other runtime.
    assemble(out, PipelineOptions(instances=args.pipeline_instances or 1,
                                  serving={"networks": "onnxruntime",
                                           "intra_op_threads": threads}))
    return out


def pipeline_instances(repository: Path) -> int:
    from server.repository import read_pipeline_config

    return read_pipeline_config(repository / "ldm_txt2img")[2]


def openvino_variants(repository: Path, threads: int, instances: int) -> dict[str, Path]:
    """{"openvino_fp32": repo, "openvino_bf16": repo}: copies of `repository` whose pipeline
    compiles the same graphs with OpenVINO at that precision (bf16 only where native)."""
    from export.openvino import native_bf16
    from server.repository import PipelineOptions, assemble

    precisions = ["fp32"] + (["bf16"] if native_bf16() else [])
    variants = {}
    for precision in precisions:
        name = f"openvino_{precision}"
        copy = repository.parent / f"model_repository_{name}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(repository.resolve(), copy)
        assemble(copy, PipelineOptions(instances=instances, serving={
            "networks": "openvino", "precision": precision, "intra_op_threads": threads}))
        variants[name] = copy
    return variants
