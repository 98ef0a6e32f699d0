"""The build steps of one export: a network's ONNX graph + parity check, its CPU-optimised
ONNX Runtime graph or its TensorRT engine, each cached under `<work_dir>` by its key.

    builder = Builder(checkpoint, out, BuildOptions(), compvis_config, allow_pickle, work_dir,
                      force)
    served_file, manifest_entry = builder.model_artifacts("unet", spec, onnx_key, ort_version)

Each network is exported from a model of its own (the checkpoint is memory-mapped, so a
1.45 B model's networks are never resident all at once), with the EMA weights when the
checkpoint has them. export/repository.py runs these steps and writes the repository.
"""
from __future__ import annotations

import gc
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from export.cache import cache_entry
from export.manifest import sha256_json
from export.onnx_export import DEFAULT_OPSET, EXTERNAL_DATA_THRESHOLD, export_onnx, onnx_digest
from export.ort import OptLevel, optimize_for_cpu
from export.parity import (
    DEFAULT_TOL,
    Contexts,
    ParityError,
    compare_with_onnx,
    reference_outputs,
    text_contexts,
)
from export.specs import GRAPHS, ExportSpec, ShapeLimits, build_specs
from export.tensorrt import EngineSettings, build_engine
from export.triton_config import MODEL_FILES, TritonOptions

log = logging.getLogger(__name__)

MODELS: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder", "vae_encoder")


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
    # OpenVINO precisions ("fp32", "bf16", "auto") the served graphs are checked at, for a
    # pipeline that runs them on OpenVINO in process (`--networks openvino`).
    openvino_parity: tuple[str, ...] = ()
    # Also write the networks' PyTorch weights (`pytorch/`, our checkpoint format, EMA
    # applied), for a pipeline that runs the modules themselves (`--networks torch`).
    torch_weights: bool = False

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


class Builder:
    """One build run's steps: each network's ONNX export and parity check, then the graph
    its backend serves, each from the cache when its key is there."""

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
                 **spec_summary(spec), "file": MODEL_FILES[self.options.triton.backend]}
        backend = self.options.triton.backend
        served_key = onnx_key  # what identifies the served graph, for the OpenVINO parity
        if backend == "python":
            served_key = ort_key = sha256_json([onnx_key, ort_version, self.options.ort_level])
            served, entry["ort_level"] = self.ort_step(name, onnx_path, ort_key)
        elif backend == "tensorrt":
            served = self.engine_step(name, onnx_path, spec)
            entry["engine"] = served.name
        else:
            served = onnx_path
        for precision in self._openvino_precisions():
            key = sha256_json([served_key, precision, _openvino_version()])
            entry.setdefault("openvino_parity", {})[precision] = self.openvino_step(
                name, spec, served, key, precision)
        return served, entry

    def _openvino_precisions(self) -> list[str]:
        from export.openvino import resolve_precision

        wanted = list(self.options.openvino_parity)
        if self.options.triton.backend == "openvino":
            wanted.append(self.options.triton.precision)
        if wanted and self.options.triton.backend == "tensorrt":
            raise ValueError("OpenVINO runs the ONNX graphs; a tensorrt build serves engines")
        return sorted({resolve_precision(p) for p in wanted})

    def openvino_step(self, name: str, spec: ExportSpec, served: Path, key: str,
                      precision: str) -> dict:
        """Cached parity of the served graph compiled by OpenVINO at `precision`."""
        from export.openvino import check_parity

        folder = self.work_dir / "openvino" / f"{name}-{key[:16]}"
        report_file = folder / "parity.json"
        if report_file.is_file() and not self.force:
            self.report.reused.append(f"{name}: openvino {precision} parity")
            self._use(folder)
            return json.loads(report_file.read_text())
        model = self.fresh_model()
        contexts = self._unet_contexts(spec, model)  # as served: from its text encoder
        references = reference_outputs(GRAPHS[name](model), spec, contexts=contexts)
        del model, contexts
        gc.collect()
        report = check_parity(served, spec, references, precision)
        summary = {k: report.to_dict()[k] for k in ("max_abs", "max_rel", "tol", "seed")}
        with cache_entry(folder) as tmp:
            (tmp / "parity.json").write_text(json.dumps(summary, indent=1))
        self.report.rebuilt.append(f"{name}: openvino {precision} parity "
                                   f"(max rel {report.max_rel:.1e})")
        self._use(folder)
        return summary

    def engine_step(self, name: str, onnx_path: Path, spec: ExportSpec) -> Path:
        engine_dir = self.work_dir / "engines"
        if self.force:
            for old in engine_dir.glob(f"{name}-*.plan"):
                old.unlink()
        existing = set(engine_dir.glob("*.plan")) if engine_dir.is_dir() else set()
        path = build_engine(self.engine_source(onnx_path, spec), spec, engine_dir,
                            self.options.engine)
        if path in existing:
            self.report.reused.append(f"{name}: tensorrt engine")
        else:
            report = self._engine_parity(path, onnx_path, spec, self._unet_contexts(spec))
            self.report.rebuilt.append(f"{name}: tensorrt {spec.engine_precision} engine + "
                                       f"parity (max rel {report.max_rel:.1e})")
        self._use(path)
        return path

    def engine_source(self, onnx_path: Path, spec: ExportSpec) -> Path:
        """The ONNX file this TensorRT builds from: the exported fp32 graph, or (strongly
        typed TensorRT 11 networks in fp16) its cached fp16 graph (export/fp16_onnx.py)."""
        import tensorrt as trt

        from export.fp16_onnx import write_fp16_onnx
        from export.tensorrt import needs_fp16_onnx

        if not needs_fp16_onnx(spec, self.options.engine, trt.__version__):
            return onnx_path
        folder = self.work_dir / "onnx16" / onnx_path.parent.name  # keyed as the fp32 graph
        if not (folder / "model.onnx").is_file() or self.force:
            with cache_entry(folder) as tmp:
                write_fp16_onnx(onnx_path, tmp)
            self.report.rebuilt.append(f"{spec.name}: fp16 onnx graph")
        self._use(folder)
        return folder / "model.onnx"

    def _unet_contexts(self, spec: ExportSpec, model=None) -> Contexts | None:
        """For the UNet, contexts its own text encoder makes (export.parity.text_contexts) in
        `model` (default: a fresh one): what its reduced-precision checks feed it; None for
        the other networks."""
        if spec.name != "unet":
            return None
        model = model if model is not None else self.fresh_model()
        te_spec = build_specs(model.config, self.options.limits)["text_encoder"]
        return text_contexts(GRAPHS["text_encoder"](model), te_spec)

    @staticmethod
    def _engine_parity(plan: Path, onnx_path: Path, spec: ExportSpec,
                       contexts: Contexts | None = None):
        """A new engine against ONNX Runtime; a failing plan is removed, never reused."""
        from export.engine_parity import check_engine_parity
        from export.parity import ParityError

        try:
            return check_engine_parity(plan, onnx_path, spec, contexts=contexts)
        except ParityError:
            plan.unlink(missing_ok=True)
            raise


def spec_summary(spec: ExportSpec) -> dict:
    return {"max_batch_size": spec.max_batch_size,
            "inputs": [asdict(t) for t in spec.inputs],
            "outputs": [asdict(t) for t in spec.outputs],
            "profile": {k: list(v) for k, v in spec.profile.items()}}


def _openvino_version() -> str:
    from importlib.metadata import version

    return version("openvino")
