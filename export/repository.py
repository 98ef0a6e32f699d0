"""Write the Triton repository of a checkpoint's networks: export, check, optimise, swap in.

    report = build_repository("runs/shapes_ldm/model", Path("model_repository"), BuildOptions())

Steps (each skipped when its cached result is up to date):
1. key the build: sha256 of the checkpoint files, the options, our source code and the
   library versions (export/manifest.py); `manifest.json` in the repository holds the key of
   the last build, so an unchanged rerun does nothing;
2. per network: ONNX export + `onnx.checker` + parity against PyTorch, then the graph its
   backend serves (export/steps.py, cached under `work_dir`);
3. write the repository into a temporary folder beside `out`: one folder per network with
   `config.pbtxt` and `1/<model file>`, `model_config.yaml` (the model's config in our
   checkpoint format, effective scale_factor included), `alphas_cumprod.npy` (the
   checkpoint's own abar_t buffer, which a sampler needs beside the networks: it may differ
   from the config's schedule, e.g. rounded to fp16 in a packed checkpoint) and
   `manifest.json` at the root;
4. swap it in atomically (export/cache.py): a failure in any step leaves the previous
   repository untouched. Top-level files of the old repository that the build does not
   write (a README) are carried over.

The text-to-image pipeline models are the serving side's: `server.repository.assemble`
adds them on top of what this writes (`python -m server` runs both).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from export.cache import (
    DEFAULT_KEEP,
    clean_orphan_homes,
    clean_stale_temps,
    evict_old_builds,
    staged_directory,
)
from export.manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    PROJECT_ROOT,
    TORCH_WEIGHTS,
    check_out_dir,
    check_same_checkpoint,
    checkpoint_digest,
    files_present,
    library_versions,
    read_manifest,
    sha256_json,
    source_digest,
)
from export.onnx_export import copy_onnx, link_or_copy
from export.specs import ExportSpec, build_specs
from export.steps import MODELS, Builder, BuildOptions, BuildReport, model_config_dict
from export.tensorrt import same_model_gpus, trt_status
from export.triton_config import TritonOptions, model_config

log = logging.getLogger(__name__)

MODEL_CONFIG = "model_config.yaml"
SCHEDULE = "alphas_cumprod.npy"  # (T,) float32 abar_t, as the checkpoint holds it
# Sources whose changes change the exported graphs, and those that change only the repository.
GRAPH_SOURCES = ("ldm/models", "ldm/modules", "ldm/config.py", "ldm/compat.py",
                 "ldm/pretrained.py", "export/specs.py", "export/onnx_export.py")
REPOSITORY_SOURCES = ("export",)
CACHES = ("onnx", "onnx16", "ort", "engines", "openvino")  # the build steps' folders in `work_dir`

__all__ = ["MODELS", "MODEL_CONFIG", "SCHEDULE", "BuildOptions", "BuildReport", "build_repository",
           "ldm_config"]


def build_repository(
    checkpoint: str | Path,
    out: str | Path,
    options: BuildOptions | None = None,
    compvis_config: str | Path | None = None,
    allow_pickle: bool = False,
    work_dir: str | Path = "build/export",
    force: bool = False,
    progress: bool = True,
    replace: bool = False,
    keep: int = DEFAULT_KEEP,
) -> BuildReport:
    """Build (or reuse) every artifact and write the Triton repository at `out`.

    A repository built from another checkpoint is not replaced unless `replace` is set
    (RepositoryConflict names both). The cache keeps the newest `keep` builds per model."""
    t_start = time.perf_counter()
    options = options or BuildOptions()
    checkpoint, out, work_dir = Path(checkpoint), Path(out), Path(work_dir)
    compvis_config = Path(compvis_config) if compvis_config else None
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    check_out_dir(out)
    work_dir.mkdir(parents=True, exist_ok=True)
    for folder in (*(work_dir / sub for sub in CACHES), out.parent):
        clean_stale_temps(folder)
    clean_orphan_homes(out)
    requested = options.triton.backend
    options, trt_info = _resolve_backend(options)
    build = Builder(checkpoint, out, options, compvis_config, allow_pickle, work_dir, force)
    keys = _Keys(build, requested, trt_info)
    old = read_manifest(out)
    check_same_checkpoint(old, checkpoint, keys.checkpoint, out, replace)
    if not force and old and old.get("repo_key") == keys.repo and files_present(out, old):
        build.report.reused.append("repository")
        build.report.seconds = time.perf_counter() - t_start
        log.info("%s is up to date", out)
        return build.report

    served, entries = {}, {}
    for name in tqdm(options.models, desc="export", unit="model", disable=not progress):
        served[name], entries[name] = build.model_artifacts(
            name, keys.specs[name], keys.onnx[name], keys.versions["onnxruntime"])
    _write_repository(build, keys, served, entries)
    for sub in CACHES:
        evict_old_builds(work_dir / sub, keep, protect=tuple(build.used))
    build.report.seconds = time.perf_counter() - t_start
    return build.report


class _Keys:
    """What a build is made from, hashed: the checkpoint, each network's export, the whole."""

    def __init__(self, build: Builder, requested: str, trt_info: str | None):
        options = build.options
        self.requested, self.trt_info = requested, trt_info
        self.checkpoint = checkpoint_digest(build.checkpoint, build.compvis_config,
                                            build.work_dir / "checkpoint_digests.json")
        self.versions = library_versions()
        self.specs = build_specs(ldm_config(build.checkpoint, build.compvis_config),
                                 options.limits)
        graph_code = source_digest(GRAPH_SOURCES)
        self.onnx = {name: sha256_json({
            "checkpoint": self.checkpoint, "spec": graph_fields(self.specs[name]),
            "opset": options.opset, "ema": options.use_ema,
            "external": options.external_data_threshold, "code": graph_code,
            "torch": self.versions["torch"], "onnx": self.versions["onnx"]})
            for name in options.models}
        self.repo = sha256_json({
            "format": MANIFEST_FORMAT, "onnx": self.onnx, "options": asdict(options),
            "requested_backend": requested, "tensorrt": trt_info, "versions": self.versions,
            "code": source_digest(REPOSITORY_SOURCES)})


def graph_fields(spec: ExportSpec) -> dict:
    """The spec's fields the ONNX graph depends on (not the engines' arithmetic)."""
    return {k: v for k, v in asdict(spec).items() if k != "engine_precision"}


def _write_repository(build: Builder, keys: _Keys, served: dict[str, Path],
                      entries: dict[str, dict]) -> None:
    """Steps 3-4 of the module docstring."""
    options, out, report = build.options, build.out, build.report
    with staged_directory(out) as tmp:
        _carry_over(out, tmp)
        for name in options.models:
            _write_model_dir(tmp, keys.specs[name], options.triton, served[name])
        model = build.loaded_model()  # memory-mapped: only its config and buffers are read
        (tmp / MODEL_CONFIG).write_text(yaml.safe_dump(model_config_dict(model),
                                                       sort_keys=False))
        np.save(tmp / SCHEDULE, model.alphas_cumprod.detach().float().numpy())
        if options.torch_weights:
            write_torch_weights(build.fresh_model(), tmp / TORCH_WEIGHTS)
        weights = {p.get("weights", "unknown") for p in report.parity.values()}
        report.weights = weights.pop() if len(weights) == 1 else "mixed: " + str(sorted(weights))
        manifest = {
            "format": MANIFEST_FORMAT, "repo_key": keys.repo,
            "checkpoint": {"path": str(build.checkpoint), "sha256": keys.checkpoint,
                           "compvis_config": (str(build.compvis_config)
                                              if build.compvis_config else None)},
            "weights": report.weights,
            "backend": options.triton.backend, "requested_backend": keys.requested,
            "tensorrt": keys.trt_info, "options": asdict(options), "versions": keys.versions,
            "models": entries, "name_prefix": options.triton.name_prefix,
            "model_config": MODEL_CONFIG, "schedule": SCHEDULE,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    report.rebuilt.append(f"repository {out} ({options.triton.backend})")


def write_torch_weights(model, folder: Path) -> None:
    """The served weights as one of our checkpoint folders (ldm.pretrained.load_pretrained
    reads it): the UNet's EMA weights in place of its training ones (use_ema_weights), the
    EMA copy itself left out, written from the memory-mapped checkpoint without a copy."""
    from safetensors.torch import save_file

    folder.mkdir()
    config = model_config_dict(model)
    config["config"]["diffusion"]["use_ema"] = False
    state, storages = {}, set()
    for key, value in model.state_dict().items():
        if key.startswith("model_ema."):
            continue
        value = value.detach().contiguous()
        storage = value.untyped_storage().data_ptr()
        state[key] = value.clone() if storage in storages else value  # safetensors: no sharing
        storages.add(storage)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


def _resolve_backend(options: BuildOptions) -> tuple[BuildOptions, str | None]:
    """(options, "TensorRT x on GPU") for tensorrt builds that can run here; without TensorRT
    or a GPU, one warning line and the onnxruntime backend instead."""
    if options.triton.backend != "tensorrt":
        return options, None
    ok, why = trt_status()
    if ok:
        gpus = options.triton.gpus or same_model_gpus()
        log.info("TensorRT engines for GPUs %s (%s)", list(gpus), why)
        triton = dataclasses.replace(options.triton, gpus=gpus)
        return dataclasses.replace(options, triton=triton), why
    log.warning("TensorRT engines skipped (%s); writing the onnxruntime backend instead", why)
    triton = dataclasses.replace(options.triton, backend="onnxruntime")
    return dataclasses.replace(options, triton=triton), None


def ldm_config(checkpoint: Path, compvis_config: Path | None):
    """The checkpoint's LDMConfig, read without loading the weights."""
    from ldm.compat import ldm_config as compvis_ldm_config
    from ldm.pretrained import read_config

    if checkpoint.is_dir():
        kind, cfg = read_config(checkpoint)
        if kind != "ldm":
            raise ValueError(f"{checkpoint} is a {kind} checkpoint, not an ldm one")
        return cfg
    if compvis_config is None:
        raise ValueError(f"{checkpoint} is a file: a CompVis checkpoint needs --compvis-config")
    model_sec = (yaml.safe_load(compvis_config.read_text()) or {}).get("model")
    if not isinstance(model_sec, dict):
        raise ValueError(f"{compvis_config}: no `model:` section")
    return compvis_ldm_config(model_sec)


def _carry_over(out: Path, tmp: Path) -> None:
    """Keep top-level files of the old repository that this build does not write."""
    if not out.is_dir():
        return
    for f in out.iterdir():
        if f.is_file() and f.name not in (MANIFEST, MODEL_CONFIG, SCHEDULE):
            shutil.copy2(f, tmp / f.name)


def _write_model_dir(repo: Path, spec: ExportSpec, triton: TritonOptions, served: Path) -> None:
    """`<repo>/<network>/config.pbtxt` and `1/` with the file its backend loads. The Python
    backend's model.py imports the installed package (export.python_backend)."""
    folder = repo / f"{triton.name_prefix}{spec.name}"
    version = folder / "1"
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(model_config(spec, triton))
    if triton.backend == "tensorrt":
        link_or_copy(served, version / "model.plan")
        return
    copy_onnx(served, version)
    if triton.backend == "python":
        shutil.copy2(PROJECT_ROOT / "export" / "triton_python_model.py", version / "model.py")
