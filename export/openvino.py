"""OpenVINO on the CPU: the exported ONNX graphs compiled at fp32 or bf16, and their parity.

    fn = openvino_function("unet/1/model.onnx", ["latent", "timestep", "context"],
                           "noise_pred", precision="auto", cache_dir=Path("~/.cache/x"))
    noise_pred = fn(latent, timestep, context)        # numpy in, numpy out

OpenVINO reads our ONNX files as they are (external data included) and compiles them for
this CPU. `INFERENCE_PRECISION_HINT` chooses the arithmetic: `f32`, or `bf16` on CPUs with
native bf16 (AVX512_BF16 / AMX): inputs and outputs stay float32, the matrix products run in
bf16 with float32 accumulation, which is the next factor of two once fp32 GEMMs are used up.
"auto" is bf16 where the CPU has it, else fp32. With `cache_dir` the compiled blob is kept
(`CACHE_DIR`), so a restart imports it instead of compiling again. The float32 pages it
packed into bf16 are given back after each new shape (export/file_pages.py).

Parity: bf16 keeps 8 bits of mantissa, so its tolerance is wider than fp32's; NaN or Inf
anywhere fails at any tolerance (export.parity.relative_error).
"""
from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from export.file_pages import release_file_pages

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "auto")
_HINTS = {"fp32": "f32", "bf16": "bf16"}
# max |a - b| / max |b| against PyTorch fp32 (export/parity.py). fp32: reordered sums and
# fused kernels, as ONNX Runtime. bf16: 8-bit mantissas through 10+ layers of products.
TOLERANCES = {"fp32": 1e-4, "bf16": 1e-1}

NumpyFn = Callable[..., np.ndarray]


def _core():
    import openvino as ov  # optional: only the openvino runtime needs it

    return ov.Core()


def native_bf16() -> bool:
    """Whether this CPU runs bf16 natively (OpenVINO's view of it)."""
    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


def resolve_precision(precision: str) -> str:
    """"fp32" or "bf16" for a requested precision ("auto": bf16 where native, else fp32)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}; allowed: {list(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16() else "fp32"
    if precision == "bf16" and not native_bf16():
        raise ValueError("precision bf16: this CPU has no native bf16 (OpenVINO would emulate "
                         "it slowly); use fp32 or auto")
    return precision


def compile_graph(path: str | Path, precision: str = "fp32", threads: int | None = None,
                  cache_dir: str | Path | None = None):
    """The ONNX graph at `path` compiled for this CPU (an openvino.CompiledModel)."""
    core = _core()
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        core.set_property({"CACHE_DIR": str(cache_dir)})
    config = {"INFERENCE_PRECISION_HINT": _HINTS[resolve_precision(precision)],
              # One request at a time, all cores on it: what the pipeline's batcher feeds.
              "PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return core.compile_model(str(path), "CPU", config)


def openvino_function(path: str | Path, inputs: list[str], output: str,
                      threads: int | None = None, precision: str = "fp32",
                      cache_dir: str | Path | None = None) -> NumpyFn:
    """fn(*arrays) -> `output` of the compiled graph, arrays given in `inputs` order. Safe
    to call from several threads (an infer request each)."""
    compiled = compile_graph(path, precision, threads, cache_dir)
    names = [port.get_any_name() for port in compiled.inputs]
    if sorted(names) != sorted(inputs):
        raise ValueError(f"{path}: graph inputs {names}, the caller names {inputs}")
    port = compiled.output(output)
    local = threading.local()
    sources = [Path(path).resolve().parent] + ([Path(cache_dir)] if cache_dir else [])
    release_file_pages(sources)  # read while compiling or importing
    shapes: set[tuple] = set()

    def call(*arrays: np.ndarray) -> np.ndarray:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        result = request.infer(dict(zip(inputs, arrays, strict=True)))
        out = np.array(result[port], copy=True)  # the request reuses its output buffer
        shape = tuple(a.shape for a in arrays)
        if shape not in shapes:  # a new shape packed its weights from the mapped files
            shapes.add(shape)
            release_file_pages(sources)
        return out

    return call


def runner(path: str | Path, output_names: list[str], precision: str,
           threads: int | None = None) -> Callable[[Mapping[str, np.ndarray]], list[np.ndarray]]:
    """run(inputs by name) -> outputs in `output_names` order (for export.parity)."""
    compiled = compile_graph(path, precision, threads)
    request = compiled.create_infer_request()

    def run(inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        result = request.infer(dict(inputs))
        return [np.array(result[compiled.output(n)], copy=True) for n in output_names]

    return run


def check_parity(onnx_path: str | Path, spec, references, precision: str,
                 tol: float | None = None):
    """The compiled graph against PyTorch's references (export.parity.References) with the
    tolerance of its precision; ParityError (NaN/Inf included) otherwise."""
    from export.parity import compare_outputs

    precision = resolve_precision(precision)
    run = runner(onnx_path, [t.name for t in spec.outputs], precision)
    return compare_outputs(run, spec, references, TOLERANCES[precision] if tol is None else tol,
                           label=f" (openvino {precision})")
