"""Assemble the Triton model repository: export, check, optimise, write configs, swap in.

    report = build_repository("runs/shapes_ldm/model", Path("model_repository"), BuildOptions())

Steps (each skipped when its cached result is up to date):
1. key the build: sha256 of the checkpoint files, the options, our source code and the
   library versions; `manifest.json` in the repository holds the key of the last build, so an
   unchanged rerun does nothing;
2. per model: ONNX export + `onnx.checker` + parity against PyTorch, cached in
   `<work_dir>/onnx/<name>-<key>/` (EMA weights when the checkpoint has them);
3. per backend: the CPU-optimised ONNX Runtime graph (python), or a TensorRT plan (tensorrt);
4. write the repository into a temporary folder beside `out`: one folder per model with
   `config.pbtxt` and `1/<model file>`, `model_config.yaml` (the model's config in our
   checkpoint format, effective scale_factor included) and `manifest.json` at the root, plus the
   pipeline models from `server.repository.write_pipeline_models` when that exists;
5. swap the new folder in atomically (renameat2 RENAME_EXCHANGE on Linux). A failure in any
   step leaves the previous repository untouched.
Top-level files already in `out` that the build does not write (a README) are carried over.
The keys and the manifest live in export/manifest.py; temporary folders, cache eviction and
the atomic swaps in export/cache.py.
"""
from __future__ import annotations

import dataclasses
import gc
import importlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from tqdm import tqdm

from export.cache import (
    DEFAULT_KEEP,
    cache_entry,
    clean_stale_temps,
    evict_old_builds,
    staged_directory,
)
from export.manifest import (
    MANIFEST,
    MANIFEST_FORMAT,
    PROJECT_ROOT,
    check_out_dir,
    check_same_checkpoint,
    checkpoint_digest,
    files_present,
    library_versions,
    read_manifest,
    sha256_json,
    source_digest,
)
from export.onnx_export import (
    DEFAULT_OPSET,
    EXTERNAL_DATA_THRESHOLD,
    copy_onnx,
    export_onnx,
    link_or_copy,
    onnx_digest,
)
from export.ort import OptLevel, optimize_for_cpu
from export.parity import DEFAULT_TOL, ParityError, compare_with_onnx, reference_outputs
from export.specs import GRAPHS, ExportSpec, ShapeLimits, build_specs
from export.tensorrt import EngineSettings, build_engine, trt_status
from export.triton_config import MODEL_FILES, TritonOptions, model_config

log = logging.getLogger(__name__)

MODELS: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
MODEL_CONFIG = "model_config.yaml"
# Sources whose changes change the exported graphs, and those that change only the repository.
GRAPH_SOURCES = ("ldm/models", "ldm/modules", "ldm/config.py", "ldm/compat.py",
                 "ldm/pretrained.py", "export/specs.py", "export/onnx_export.py")
# (plus the pipeline writer's own PIPELINE_SOURCES, see _pipeline_sources)
REPOSITORY_SOURCES = ("export", "server/repository.py", "server/triton_models")
# Copied into every Python-backend model's version folder, so it runs without this project.
PYTHON_BACKEND_FILES = ("export/ort.py", "export/python_backend.py")


@dataclass(frozen=True)
class BuildOptions:
    triton: TritonOptions = field(default_factory=TritonOptions)
    models: tuple[str, ...] = MODELS
    limits: ShapeLimits = field(default_factory=ShapeLimits)
    opset: int = DEFAULT_OPSET
    use_ema: bool = True
    ort_level: OptLevel = "auto"
    parity_tol: float = DEFAULT_TOL
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD
    engine: EngineSettings = field(default_factory=EngineSettings)

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"unknown model(s) {unknown} (allowed: {list(MODELS)})")
        if self.parity_tol <= 0:
            raise ValueError(f"parity_tol must be > 0, got {self.parity_tol}")


@dataclass
class BuildReport:
    out: Path
    backend: str
    rebuilt: list[str] = field(default_factory=list)  # "unet: onnx export", ...
    reused: list[str] = field(default_factory=list)
    parity: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    weights: str = ""  # "ema" or "training": which UNet weights the graphs carry
    seconds: float = 0.0

    @property
    def up_to_date(self) -> bool:
        return not self.rebuilt


# --- the build -----------------------------------------------------------------------------

def load_model(checkpoint: Path, compvis_config: Path | None, allow_pickle: bool = False):
    """Our checkpoint folder, or a CompVis YAML + .ckpt, as a LatentDiffusion in eval mode."""
    from ldm.compat import load_compvis
    from ldm.models.diffusion import LatentDiffusion

    model = load_compvis(compvis_config, checkpoint, allow_pickle=allow_pickle)
    if not isinstance(model, LatentDiffusion):
        raise ValueError(f"{checkpoint} holds a {type(model).__name__}, not a LatentDiffusion")
    return model.eval()


def use_ema_weights(model, wanted: bool) -> str:
    """Point the UNet's parameters at the EMA weights when the model has them (no copy: the
    weights may be a memory-mapped file); returns which weights are used."""
    if wanted and getattr(model, "use_ema", False):
        shadows = dict(model.model_ema.named_buffers())
        for name, p in model.model.named_parameters():
            if name in model.model_ema.m_name2s_name:
                p.data = shadows[model.model_ema.m_name2s_name[name]]
        log.info("exporting the EMA weights (model_ema) of the UNet")
        return "ema"
    if wanted:
        log.info("the checkpoint has no EMA weights: exporting the training weights")
    return "training"


def model_config_dict(model) -> dict:
    """Our config.yaml format, with the scale_factor the model actually uses (it may have been
    estimated from data and live in a buffer)."""
    from ldm.config import to_dict

    cfg = to_dict(model.config)
    cfg["diffusion"]["scale_factor"] = float(model.scale_factor)
    return {"kind": "ldm", "config": cfg}


class _Build:
    """One build run: keys, caches and the report (the steps of the module docstring)."""

    def __init__(self, checkpoint: Path, out: Path, options: BuildOptions,
                 compvis_config: Path | None, allow_pickle: bool, work_dir: Path, force: bool):
        self.checkpoint, self.out, self.options = checkpoint, out, options
        self.compvis_config, self.allow_pickle = compvis_config, allow_pickle
        self.work_dir, self.force = work_dir, force
        self.model = None
        self.weights = "training"
        self.report = BuildReport(out, options.triton.backend)
        self.used: list[Path] = []  # cache entries this build serves (never evicted by it)

    def loaded_model(self):
        """The model for its config, schedule and tokenizer (its weights stay unread)."""
        if self.model is None:
            self.model = self.fresh_model()
        return self.model

    def fresh_model(self):
        """A model of its own for one network's export: the checkpoint is memory-mapped, so
        the pages a network's export reads leave memory with this model (a 1.45 B model's
        networks are then never resident all at once)."""
        model = load_model(self.checkpoint, self.compvis_config, self.allow_pickle)
        self.weights = use_ema_weights(model, self.options.use_ema)
        return model

    def onnx_step(self, name: str, spec: ExportSpec, key: str) -> tuple[Path, dict]:
        """Cached export + parity of one model: (model.onnx, parity report dict)."""
        folder = self.work_dir / "onnx" / f"{name}-{key[:16]}"
        report_file = folder / "parity.json"
        if folder.is_dir() and report_file.is_file() and not self.force:
            parity = json.loads(report_file.read_text())
            if parity["max_rel"] > self.options.parity_tol:
                raise ParityError(f"{name}: cached export has max rel {parity['max_rel']:.2e} "
                                  f"> {self.options.parity_tol:g}")
            self.report.reused.append(f"{name}: onnx")
            self._use(folder)
            return folder / "model.onnx", parity
        graph = GRAPHS[name](self.fresh_model())
        with cache_entry(folder) as tmp:
            t0 = time.perf_counter()
            path = export_onnx(graph, spec, tmp / "model.onnx", self.options.opset,
                               self.options.external_data_threshold)
            seconds = time.perf_counter() - t0
            references = reference_outputs(graph, spec)
            del graph
            gc.collect()  # unmaps the checkpoint pages this network read, before ORT loads
            parity = compare_with_onnx(path, spec, references,
                                       self.options.parity_tol).to_dict()
            parity.update(export_seconds=seconds, weights=self.weights)
            (tmp / "parity.json").write_text(json.dumps(parity, indent=1))
        self.report.rebuilt.append(f"{name}: onnx export ({seconds:.1f} s) + parity")
        self._use(folder)
        return folder / "model.onnx", parity

    def ort_step(self, name: str, onnx_path: Path, key: str) -> tuple[Path, str]:
        """Cached CPU-optimised graph: (model.onnx, level used)."""
        folder = self.work_dir / "ort" / f"{name}-{key[:16]}"
        level_file = folder / "level.txt"
        if level_file.is_file() and not self.force:
            self.report.reused.append(f"{name}: onnxruntime-optimised graph")
            self._use(folder)
            return folder / "model.onnx", level_file.read_text().strip()
        with cache_entry(folder) as tmp:
            level = optimize_for_cpu(onnx_path, tmp / "model.onnx", self.options.ort_level)
            (tmp / "level.txt").write_text(level)
        self.report.rebuilt.append(f"{name}: onnxruntime graph (level {level})")
        self._use(folder)
        return folder / "model.onnx", level

    def _use(self, entry: Path) -> None:
        """Mark a cache entry as this build's: newest for eviction, and protected."""
        os.utime(entry)
        self.used.append(entry)

    def model_artifacts(self, name: str, spec: ExportSpec, onnx_key: str,
                        ort_version: str) -> tuple[Path, dict]:
        """(the file the backend serves, its manifest entry) for one model."""
        onnx_path, parity = self.onnx_step(name, spec, onnx_key)
        self.report.parity[name] = parity
        entry = {"onnx_key": onnx_key, "onnx_sha256": onnx_digest(onnx_path),
                 "parity": {**{k: parity[k] for k in ("max_abs", "max_rel", "seed")},
                            "tol": self.options.parity_tol,
                            "all_zero_outputs": parity.get("all_zero_outputs", [])},
                 **_spec_summary(spec), "file": MODEL_FILES[self.options.triton.backend]}
        backend = self.options.triton.backend
        if backend == "python":
            ort_key = sha256_json([onnx_key, ort_version, self.options.ort_level])
            served, entry["ort_level"] = self.ort_step(name, onnx_path, ort_key)
        elif backend == "tensorrt":
            served = self.engine_step(name, onnx_path, spec)
            entry["engine"] = served.name
        else:
            served = onnx_path
        return served, entry

    def engine_step(self, name: str, onnx_path: Path, spec: ExportSpec) -> Path:
        engine_dir = self.work_dir / "engines"
        if self.force:
            for old in engine_dir.glob(f"{name}-*.plan"):
                old.unlink()
        existing = set(engine_dir.glob("*.plan")) if engine_dir.is_dir() else set()
        path = build_engine(onnx_path, spec, engine_dir, self.options.engine)
        if path in existing:
            self.report.reused.append(f"{name}: tensorrt engine")
        else:
            self.report.rebuilt.append(f"{name}: tensorrt engine")
        self._use(path)
        return path


def build_repository(
    checkpoint: str | Path,
    out: str | Path,
    options: BuildOptions = BuildOptions(),
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
    checkpoint, out, work_dir = Path(checkpoint), Path(out), Path(work_dir)
    compvis_config = Path(compvis_config) if compvis_config else None
    if not checkpoint.exists():
        raise FileNotFoundError(f"checkpoint {checkpoint} not found")
    check_out_dir(out)
    work_dir.mkdir(parents=True, exist_ok=True)
    for folder in (work_dir / "onnx", work_dir / "ort", work_dir / "engines", out.parent):
        clean_stale_temps(folder)
    requested = options.triton.backend
    options, trt_info = _resolve_backend(options)
    build = _Build(checkpoint, out, options, compvis_config, allow_pickle, work_dir, force)
    report = build.report

    # 1. keys
    ckpt = checkpoint_digest(checkpoint, compvis_config, work_dir / "checkpoint_digests.json")
    versions = library_versions()
    graph_code = source_digest(GRAPH_SOURCES)
    specs = build_specs(_ldm_config(checkpoint, compvis_config), options.limits)
    onnx_keys = {name: sha256_json({
        "checkpoint": ckpt, "spec": asdict(specs[name]), "opset": options.opset,
        "ema": options.use_ema, "external": options.external_data_threshold,
        "code": graph_code, "torch": versions["torch"], "onnx": versions["onnx"]})
        for name in options.models}
    repo_key = sha256_json({
        "format": MANIFEST_FORMAT, "onnx": onnx_keys, "options": asdict(options),
        "requested_backend": requested, "tensorrt": trt_info, "versions": versions,
        "code": source_digest(REPOSITORY_SOURCES + _pipeline_sources())})
    old = read_manifest(out)
    check_same_checkpoint(old, checkpoint, ckpt, out, replace)
    if not force and old and old.get("repo_key") == repo_key and files_present(out, old):
        report.reused.append("repository")
        report.seconds = time.perf_counter() - t_start
        log.info("%s is up to date", out)
        return report

    # 2.-3. per-model artifacts
    served, entries = {}, {}
    for name in tqdm(options.models, desc="export", unit="model", disable=not progress):
        served[name], entries[name] = build.model_artifacts(name, specs[name], onnx_keys[name],
                                                            versions["onnxruntime"])

    # 4.-5. assemble and swap
    with staged_directory(out) as tmp:
        _carry_over(out, tmp)
        for name in options.models:
            _write_model_dir(tmp, specs[name], options.triton, served[name])
        cfg = _model_config(checkpoint, compvis_config, build)
        (tmp / MODEL_CONFIG).write_text(yaml.safe_dump(cfg, sort_keys=False))
        pipeline_note = _write_pipeline(tmp, build, specs, options)
        report.notes.append(pipeline_note)
        weights = {p.get("weights", "unknown") for p in report.parity.values()}
        report.weights = weights.pop() if len(weights) == 1 else "mixed: " + str(sorted(weights))
        manifest = {
            "format": MANIFEST_FORMAT, "repo_key": repo_key,
            "checkpoint": {"path": str(checkpoint), "sha256": ckpt,
                           "compvis_config": str(compvis_config) if compvis_config else None},
            "weights": report.weights,
            "backend": options.triton.backend, "requested_backend": requested,
            "tensorrt": trt_info, "options": asdict(options), "versions": versions,
            "models": entries, "model_config": MODEL_CONFIG, "pipeline": pipeline_note,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    report.rebuilt.append(f"repository {out} ({options.triton.backend})")
    used = tuple(build.used)
    for sub in ("onnx", "ort", "engines"):
        evict_old_builds(work_dir / sub, keep, protect=used)
    report.seconds = time.perf_counter() - t_start
    return report


def _resolve_backend(options: BuildOptions) -> tuple[BuildOptions, str | None]:
    """(options, "TensorRT x on GPU") for tensorrt builds that can run here; without TensorRT
    or a GPU, one warning line and the onnxruntime backend instead."""
    if options.triton.backend != "tensorrt":
        return options, None
    ok, why = trt_status()
    if ok:
        return options, why
    log.warning("TensorRT engines skipped (%s); writing the onnxruntime backend instead", why)
    triton = dataclasses.replace(options.triton, backend="onnxruntime")
    return dataclasses.replace(options, triton=triton), None


def _ldm_config(checkpoint: Path, compvis_config: Path | None):
    """The checkpoint's LDMConfig, read without loading the weights."""
    from ldm.compat import ldm_config
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
    return ldm_config(model_sec)


def _model_config(checkpoint: Path, compvis_config: Path | None, build: _Build) -> dict:
    """model_config.yaml's content, without loading the weights when nothing needed them. A
    data-estimated scale_factor is a buffer in the weights: then the model is loaded."""
    cfg = _ldm_config(checkpoint, compvis_config)
    if build.model is not None or cfg.diffusion.scale_by_std:
        return model_config_dict(build.loaded_model())
    from ldm.config import to_dict

    return {"kind": "ldm", "config": to_dict(cfg)}


def _spec_summary(spec: ExportSpec) -> dict:
    return {"max_batch_size": spec.max_batch_size,
            "inputs": [asdict(t) for t in spec.inputs],
            "outputs": [asdict(t) for t in spec.outputs],
            "profile": {k: list(v) for k, v in spec.profile.items()}}


def _carry_over(out: Path, tmp: Path) -> None:
    """Keep top-level files of the old repository that this build does not write."""
    if not out.is_dir():
        return
    for f in out.iterdir():
        if f.is_file() and f.name not in (MANIFEST, MODEL_CONFIG):
            shutil.copy2(f, tmp / f.name)


def _write_model_dir(repo: Path, spec: ExportSpec, triton: TritonOptions, served: Path) -> None:
    folder = repo / spec.name
    version = folder / "1"
    version.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(model_config(spec, triton))
    if triton.backend == "tensorrt":
        link_or_copy(served, version / "model.plan")
        return
    copy_onnx(served, version)
    if triton.backend == "python":
        shutil.copy2(PROJECT_ROOT / "export" / "triton_python_model.py", version / "model.py")
        package = version / "export"
        package.mkdir()
        (package / "__init__.py").write_text("")
        for rel in PYTHON_BACKEND_FILES:
            shutil.copy2(PROJECT_ROOT / rel, package / Path(rel).name)


def _pipeline_module():
    try:
        return importlib.import_module("server.repository")
    except ImportError:
        return None


def _pipeline_writer():
    return getattr(_pipeline_module(), "write_pipeline_models", None)


def _pipeline_sources() -> tuple[str, ...]:
    """The files the pipeline models copy into the repository (they change what it serves)."""
    return tuple(getattr(_pipeline_module(), "PIPELINE_SOURCES", ()))


def _write_pipeline(repo: Path, build: _Build, specs: dict, options: BuildOptions) -> str:
    writer = _pipeline_writer()
    if writer is None:
        return "pipeline models skipped: server.repository.write_pipeline_models not found"
    names = writer(repo, build.loaded_model(), specs, {
        "backend": options.triton.backend, "models": list(options.models),
        "model_config": MODEL_CONFIG, "instance_kind": options.triton.instance_kind,
        "instances": options.triton.instances, "max_batch": options.limits.max_batch,
        "weights": build.weights,
    })
    if not names:
        return "pipeline models skipped by server.repository.write_pipeline_models"
    return f"pipeline models {', '.join(names)} written by server.repository"
