"""`config.pbtxt` for one exported model, from its `ExportSpec` and the serving options.

Triton's batch dimension: with `max_batch_size > 0` every tensor's leading axis is implicit,
so a config lists the spec's dims *after* "batch" (dynamic axes as -1). The UNet's `timestep`
is a (B,) tensor, which would leave `dims: []`; Triton refuses to load that ("model input
'timestep' must specify 'dims'", seen with Triton 2.51), so it is declared the way Triton
documents for batched scalars:

    dims: [ 1 ]  reshape: { shape: [ ] }

Clients (and the BLS pipeline) send `timestep` as (B, 1) int64; Triton hands the model a (B,)
tensor, as the ONNX graph and the TensorRT engine expect. Nothing changes in the graphs.

Backends: "tensorrt" (`tensorrt_plan`, `model.plan`, GPU instances), "onnxruntime"
(`onnxruntime_onnx`, `model.onnx`, CPU or GPU instances; both in NVIDIA's Triton image) and
"python" (our `model.py` running ONNX Runtime on the CPU; the only backend in the Triton
binary of the `nvidia-pytriton` wheel).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # kept light: the CLI imports this module before torch
    from export.specs import ExportSpec, TensorSpec

Backend = Literal["python", "onnxruntime", "tensorrt"]
BACKENDS: tuple[str, ...] = ("python", "onnxruntime", "tensorrt")
DEVICES: tuple[str, ...] = ("cpu", "gpu")
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
# The file each backend loads from `<model>/1/`.
MODEL_FILES = {"python": "model.py", "onnxruntime": "model.onnx", "tensorrt": "model.plan"}


@dataclass(frozen=True)
class TritonOptions:
    backend: Backend = "python"
    device: Literal["cpu", "gpu"] = "cpu"  # ONNX Runtime backend only; tensorrt is GPU-only
    instances: int = 1  # model instances per device
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    threads: int = 0  # intra-op threads per CPU instance; 0: usable cores / instances

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r} (allowed: {list(BACKENDS)})")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r} (allowed: {list(DEVICES)})")
        if self.backend == "python" and self.device == "gpu":
            raise ValueError("the python backend runs ONNX Runtime on the CPU: use device cpu")
        if self.instances < 1:
            raise ValueError(f"instances must be >= 1, got {self.instances}")
        if self.max_queue_delay_us < 0 or self.threads < 0:
            raise ValueError("max_queue_delay_us and threads must be >= 0")

    @property
    def instance_kind(self) -> str:
        if self.backend == "tensorrt" or self.device == "gpu":
            return "KIND_GPU"
        return "KIND_CPU"


def triton_dims(tensor: TensorSpec, batched: bool) -> tuple[list[int], list[int] | None]:
    """(dims, reshape) of a spec tensor in config.pbtxt; reshape None means none needed."""
    shape = list(tensor.shape)
    if batched:
        if not shape or shape[0] != "batch":
            raise ValueError(f"{tensor.name}: a batched model needs a leading 'batch' axis")
        shape = shape[1:]
    dims = [-1 if isinstance(d, str) else int(d) for d in shape]
    if not dims:  # a (B,) tensor: Triton needs non-empty dims
        return [1], []
    return dims, None


def _tensor_block(tensor: TensorSpec, batched: bool) -> str:
    dims, reshape = triton_dims(tensor, batched)
    lines = [f'    name: "{tensor.name}"',
             f"    data_type: {TRITON_DTYPES[tensor.dtype]}",
             f"    dims: [ {', '.join(map(str, dims))} ]"]
    if reshape is not None:
        lines.append(f"    reshape: {{ shape: [ {', '.join(map(str, reshape))} ] }}")
    return "  {\n" + "\n".join(lines) + "\n  }"


def _quote(value: str) -> str:
    """A protobuf text-format string literal (quotes and backslashes escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _parameters(params: dict[str, str]) -> str:
    items = [f'  {{ key: {_quote(k)} value: {{ string_value: {_quote(v)} }} }}'
             for k, v in params.items()]
    return "parameters [\n" + ",\n".join(items) + "\n]"


def model_config(spec: ExportSpec, options: TritonOptions) -> str:
    """The config.pbtxt text for `spec` served by `options.backend`."""
    batched = spec.max_batch_size > 0
    head = [f'name: "{spec.name}"']
    if options.backend == "python":
        head.append('backend: "python"')
    elif options.backend == "onnxruntime":
        head.append('platform: "onnxruntime_onnx"')
    else:
        head.append('platform: "tensorrt_plan"')
    head.append(f"max_batch_size: {spec.max_batch_size if batched else 0}")
    parts = ["\n".join(head),
             "input [\n" + ",\n".join(_tensor_block(t, batched) for t in spec.inputs) + "\n]",
             "output [\n" + ",\n".join(_tensor_block(t, batched) for t in spec.outputs) + "\n]"]
    if spec.dynamic_batching and batched:
        parts.append("dynamic_batching {\n"
                     f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n}}")
    parts.append("instance_group [\n"
                 f"  {{ count: {options.instances} kind: {options.instance_kind} }}\n]")
    if options.instance_kind == "KIND_CPU":
        threads = str(options.threads)  # "0": decided at load from the cores there
        if options.backend == "python":
            # The model validates requests against the spec's ranges (export/python_backend.py).
            parts.append(_parameters({"intra_op_threads": threads,
                                      "limits": json.dumps(spec.serving_limits())}))
        else:  # onnxruntime_backend's names; execution_mode 0 = sequential
            parts.append(_parameters({"intra_op_thread_count": threads,
                                      "inter_op_thread_count": "1",
                                      "execution_mode": "0"}))
    header = "# Written by export/build_engines.py from export/specs.py; do not edit by hand.\n"
    return header + "\n".join(parts) + "\n"
