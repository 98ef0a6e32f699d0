"""A built TensorRT engine against ONNX Runtime, at the profile's shapes (GPU hosts only).

    run = engine_runner(plan, spec)                 # numpy in, numpy out, on the GPU
    report = check_engine_parity(plan, onnx_path, spec)   # ParityError when it drifts

The engine is checked after every build, at the profile's min, opt and max shapes (and the
largest batch at the smallest size: `export.parity.parity_points`), against ONNX Runtime fp32
on the same seeded inputs, with the tolerance of the engine's precision; NaN or Inf anywhere
fails (an fp16 overflow would otherwise become a black image). It has not run here: this
machine has no GPU and no TensorRT, so `tests/export/test_tensorrt.py` skips it.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.parity import (
    Contexts,
    ParityReport,
    References,
    compare_outputs,
    reference_outputs,
)
from export.specs import ExportSpec

# max |engine - ORT| / max |ORT|. fp16: 10-bit mantissas through tens of layers; fp32: TF32
# is off in TensorRT by default, so only reordered sums.
ENGINE_TOLERANCES = {"fp16": 2e-2, "fp32": 1e-4}

Run = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def engine_runner(plan: str | Path, spec: ExportSpec) -> Run:
    """run(inputs by name) -> outputs in spec order, through the engine on CUDA tensors."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(plan).read_bytes())
    if engine is None:
        raise RuntimeError(f"{plan}: TensorRT cannot load this plan")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()
    dtypes = {"float32": torch.float32, "int64": torch.int64}

    def run(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        # Copies, allocations and the engine all on one stream: each waits for the one before
        # (copying on the default stream and running on another needs a wait_stream).
        with torch.cuda.stream(stream):
            device = {k: torch.from_numpy(np.ascontiguousarray(v)).to("cuda")
                      for k, v in inputs.items()}
            for name, t in device.items():
                context.set_input_shape(name, tuple(t.shape))
                context.set_tensor_address(name, t.data_ptr())
            outputs = []
            for t in spec.outputs:
                out = torch.empty(tuple(context.get_tensor_shape(t.name)),
                                  dtype=dtypes[t.dtype], device="cuda")
                context.set_tensor_address(t.name, out.data_ptr())
                outputs.append(out)
            if not context.execute_async_v3(stream.cuda_stream):
                raise RuntimeError(f"{spec.name}: TensorRT execution failed")
        stream.synchronize()
        return [o.cpu().numpy() for o in outputs]

    return run


def onnxruntime_references(onnx_path: str | Path, spec: ExportSpec,
                           seed: int | None = None, contexts: Contexts | None = None
                           ) -> References:
    """ONNX Runtime's (fp32) outputs at each parity point on seeded random inputs (the
    UNet's `context` from `contexts`, export.parity.text_contexts, when given)."""
    import torch

    from export.ort import make_session

    session = make_session(onnx_path)
    names = [t.name for t in spec.outputs]

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {t.name: x.numpy() for t, x in zip(spec.inputs, inputs, strict=True)}
        return tuple(torch.from_numpy(o) for o in session.run(names, feeds))

    return reference_outputs(run, spec, seed, contexts=contexts)


def check_engine_parity(plan: str | Path, onnx_path: str | Path, spec: ExportSpec,
                        tol: float | None = None, contexts: Contexts | None = None
                        ) -> ParityReport:
    """The engine against ONNX Runtime with its precision's tolerance; ParityError if not.
    An fp16 UNet is checked on its text encoder's contexts (`contexts`), as the bf16 one
    is on OpenVINO: on N(0, 1) contexts its error overstates the served one."""
    references = onnxruntime_references(onnx_path, spec, contexts=contexts)
    tol = ENGINE_TOLERANCES[spec.engine_precision] if tol is None else tol
    return compare_outputs(engine_runner(plan, spec), spec, references, tol,
                           label=f" (tensorrt {spec.engine_precision})")
