"""TensorRT fp16 engines from the exported ONNX files, one optimisation profile per spec.

    status = trt_status()                       # (available, why not)
    plan = build_engine(onnx_path, spec, engine_dir, EngineSettings())

`tensorrt` is imported only inside the functions that need it, so everything else here (the
profile shapes, cache keys, builder settings) runs and is tested on machines without it.

Engines are cached as `<engine_dir>/<name>-<key>.plan`, key = sha256(ONNX file + external data,
TensorRT version, GPU name, builder settings, profile): a plan is only valid for the TensorRT
version and GPU model that built it, and Triton must run the same TensorRT version. One timing
cache file per GPU/TensorRT version is shared by all builds, so a rebuild after a small graph
change skips most kernel timing.

Precision: per network (`ExportSpec.engine_precision`): the text encoder and the UNet in
fp16 with fp32 I/O (the spec's dtypes), the VAE in fp32. TensorRT 8-10 get the fp16 builder
flag on the fp32 graph (weak typing: TensorRT picks each layer's precision), with softmax,
normalization, reduce and unary layers pinned to fp32 (FP32_LAYERS). TensorRT 11 has
no such flag: its networks are strongly typed, built from an fp16 ONNX file whose fp32
islands (softmax, norms, the timestep embedding) are chosen by export/fp16_onnx.py; the
plan says which file it needs (`"onnx": "fp16"`). Every new engine is compared with ONNX
Runtime fp32 (export/engine_parity.py). int64 I/O (`input_ids`, `timestep`) needs
TensorRT >= 10.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

from export.onnx_export import onnx_digest
from export.specs import ExportSpec

log = logging.getLogger(__name__)

Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineSettings:
    """What a build depends on besides the ONNX file, the GPU and the TensorRT version."""

    fp16: bool = True
    workspace_gib: float = 8.0  # scratch memory tactics may use
    optimization_level: int = 3  # builder optimisation level, 0..5 (3 is TensorRT's default)


def profile_shapes(spec: ExportSpec) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per input: (min, opt, max) shapes for `IOptimizationProfile.set_shape`."""
    return {t.name: tuple(spec.concrete_shape(t, which) for which in range(3))
            for t in spec.inputs}


# TensorRT majors whose weakly typed builder takes the FP16 flag: it is deprecated from 10.12
# and gone in 11, where a network's types come from the ONNX file (strongly typed networks).
FLAG_TYPED_MAJORS = (8, 9, 10)


def builder_plan(spec: ExportSpec, settings: EngineSettings, trt_version: str = "10.0.0") -> dict:
    """Everything `build_engine` sets on the builder config, as plain data (tested here, used
    verbatim on the GPU host). fp16 where both the settings and the network's spec ask for it
    (`ExportSpec.engine_precision`: the VAE stays fp32): by the FP16 flag on TensorRT 8-10,
    by a strongly typed network from the fp16 ONNX file (`onnx`) from 11 on."""
    if not 0 <= settings.optimization_level <= 5:
        raise ValueError(f"optimization_level must be in 0..5, got {settings.optimization_level}")
    if settings.workspace_gib <= 0:
        raise ValueError(f"workspace_gib must be > 0, got {settings.workspace_gib}")
    major = int(trt_version.split(".")[0])
    if major < FLAG_TYPED_MAJORS[0]:
        raise ValueError(f"TensorRT {trt_version} is too old: supported from 8 on (10 for the "
                         "int64 inputs)")
    fp16 = settings.fp16 and spec.engine_precision == "fp16"
    typed = major not in FLAG_TYPED_MAJORS
    weak_fp16 = fp16 and not typed
    return {
        # PREFER_PRECISION_CONSTRAINTS: the layers pinned below stay fp32 unless TensorRT has
        # no fp32 kernel for them (then it warns), instead of whatever timing picks.
        "flags": ["FP16", "PREFER_PRECISION_CONSTRAINTS"] if weak_fp16 else [],
        "fp32_layers": list(FP32_LAYERS) if weak_fp16 else [],
        "network_flags": ["STRONGLY_TYPED"] if typed else [],
        "onnx": "fp16" if fp16 and typed else "fp32",
        "workspace_bytes": int(settings.workspace_gib * 2**30),
        "optimization_level": settings.optimization_level,
        "profile": {k: [list(s) for s in v] for k, v in profile_shapes(spec).items()},
    }


# Layer types a weakly typed fp16 build pins to fp32 (what the strongly typed path's fp16 ONNX
# keeps in fp32, export/fp16_onnx.py): attention's softmax, LayerNorm / GroupNorm (parsed as
# normalization layers), reductions, and unary ops (sin/cos of the timestep embedding, exp,
# sqrt): cheap layers where fp16 loses range or phase.
FP32_LAYERS = ("SOFTMAX", "NORMALIZATION", "REDUCE", "UNARY")


def needs_fp16_onnx(spec: ExportSpec, settings: EngineSettings, trt_version: str) -> bool:
    """Whether this TensorRT builds `spec`'s engine from the fp16 ONNX file."""
    return builder_plan(spec, settings, trt_version)["onnx"] == "fp16"


def engine_key(onnx_hash: str, trt_version: str, gpu_name: str, spec: ExportSpec,
               settings: EngineSettings) -> str:
    """sha256 of what a plan depends on (hex, first 16 characters are used in file names)."""
    payload = {"onnx": onnx_hash, "tensorrt": trt_version, "gpu": gpu_name,
               "settings": asdict(settings), "plan": builder_plan(spec, settings, trt_version)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def engine_path(engine_dir: str | Path, name: str, key: str) -> Path:
    return Path(engine_dir) / f"{name}-{key[:16]}.plan"


def timing_cache_path(engine_dir: str | Path, trt_version: str, gpu_name: str) -> Path:
    """One timing cache per (TensorRT version, GPU model): timings do not transfer."""
    gpu = "".join(c if c.isalnum() else "_" for c in gpu_name)
    return Path(engine_dir) / f"timing-trt{trt_version}-{gpu}.cache"


def trt_status() -> tuple[bool, str]:
    """(True, "TensorRT x on GPU") when engines can be built here, else (False, reason)."""
    try:
        import tensorrt as trt
    except ImportError:
        return False, "no `tensorrt` package"
    import torch

    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} present but no CUDA GPU"
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


def same_model_gpus(names: list[str] | None = None) -> tuple[int, ...]:
    """Ids of the GPUs of GPU 0's model (the one engines are built on and keyed by), from
    `names` (each GPU's name, in id order; default: this host's)."""
    if names is None:
        import torch

        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return tuple(i for i, n in enumerate(names) if n == names[0]) if names else ()


def build_engine(onnx_path: str | Path, spec: ExportSpec, engine_dir: str | Path,
                 settings: EngineSettings = EngineSettings()) -> Path:
    """The cached plan for this ONNX file, GPU and TensorRT version, built if missing.
    `onnx_path` is the file the plan's `onnx` names (export/steps.py picks it)."""
    import tensorrt as trt

    engine_dir = Path(engine_dir)
    engine_dir.mkdir(parents=True, exist_ok=True)
    gpu = gpu_name()
    key = engine_key(onnx_digest(onnx_path), trt.__version__, gpu, spec, settings)
    path = engine_path(engine_dir, spec.name, key)
    if path.is_file():
        log.info("%s: engine up to date (%s)", spec.name, path.name)
        return path
    plan = builder_plan(spec, settings, trt.__version__)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    major = int(trt.__version__.split(".")[0])
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    for flag in plan["network_flags"]:
        flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, flag))
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file resolves model.onnx.data relative to the file.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{spec.name}: TensorRT cannot parse {onnx_path}: {errors}")
    inputs = [network.get_input(i).name for i in range(network.num_inputs)]
    if sorted(inputs) != sorted(plan["profile"]):
        raise RuntimeError(f"{spec.name}: network inputs {inputs} != spec {list(plan['profile'])}")

    pin_fp32_layers(network, plan["fp32_layers"])
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, plan["workspace_bytes"])
    config.builder_optimization_level = plan["optimization_level"]
    for flag in plan["flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in plan["profile"].items():
        profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(profile)

    cache_file = timing_cache_path(engine_dir, trt.__version__, gpu)
    cache = config.create_timing_cache(cache_file.read_bytes() if cache_file.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)

    log.info("%s: building TensorRT engine (%s)", spec.name,
             ", ".join(plan["flags"] + plan["network_flags"]) or "fp32")
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{spec.name}: TensorRT engine build failed (see the log above)")
    tmp = path.with_suffix(".plan.tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(path)
    timing = config.get_timing_cache()
    cache_tmp = cache_file.with_suffix(".tmp")
    cache_tmp.write_bytes(bytes(timing.serialize()))
    cache_tmp.replace(cache_file)
    return path


def pin_fp32_layers(network, layer_types: list[str]) -> int:
    """Ask for fp32 compute and outputs on every layer of `layer_types` (trt.LayerType names);
    the number of layers pinned."""
    import tensorrt as trt

    wanted = {getattr(trt.LayerType, name) for name in layer_types}
    pinned = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type in wanted:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
            pinned += 1
    return pinned
