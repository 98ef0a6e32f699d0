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
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # kept light: the CLI imports this module before torch
    from export.specs import ExportSpec, TensorSpec

Backend = Literal["python", "onnxruntime", "tensorrt", "openvino"]
BACKENDS: tuple[str, ...] = ("python", "onnxruntime", "tensorrt", "openvino")
DEVICES: tuple[str, ...] = ("cpu", "gpu")
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL"}
# The file each backend loads from `<model>/1/`.
MODEL_FILES = {"python": "model.py", "onnxruntime": "model.onnx", "tensorrt": "model.plan",
               "openvino": "model.onnx"}


@dataclass(frozen=True)
class TritonOptions:
    backend: Backend = "python"
    device: Literal["cpu", "gpu"] = "cpu"  # ONNX Runtime backend only; tensorrt is GPU-only
    instances: int = 1  # model instances per device
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    threads: int = 0  # intra-op threads per CPU instance; 0: usable cores / instances
    precision: Literal["fp32", "bf16", "auto"] = "fp32"  # openvino backend's arithmetic
    # KIND_GPU instances only on these GPUs (() : on every GPU). A TensorRT plan runs only on
    # the GPU model that built it: the build lists the GPUs of that model.
    gpus: tuple[int, ...] = ()
    # Put before each network's Triton model name ("emoji_" -> emoji_unet), so that several
    # models' repositories can be served by one Triton without two models of one name.
    name_prefix: str = ""

    def __post_init__(self) -> None:
        if not re.fullmatch(r"([a-z0-9][a-z0-9-]*_)?", self.name_prefix):
            raise ValueError(f"name_prefix {self.name_prefix!r}: lower-case letters, digits and "
                             "dashes, ending with '_' (or empty)")
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
        if self.backend == "openvino" and self.device == "gpu":
            raise ValueError("the openvino backend runs on the CPU: use device cpu")
        if self.precision != "fp32" and self.backend != "openvino":
            raise ValueError(f"precision {self.precision} is for the openvino backend")
        if self.gpus and self.instance_kind != "KIND_GPU":
            raise ValueError(f"gpus {list(self.gpus)} are for GPU instances (tensorrt, or "
                             "onnxruntime on device gpu)")

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


def _model_config_pb2():
    # tritonclient's copy of Triton's own schema (model_config.proto): what the server parses.
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def tensor_config(name: str, dtype: str, dims: list[int], *, output: bool = False,
                  reshape: list[int] | None = None, optional: bool = False):
    """A ModelInput (or ModelOutput) message; `dtype` is Triton's name ("TYPE_FP32")."""
    pb = _model_config_pb2()
    message = (pb.ModelOutput if output else pb.ModelInput)(
        name=name, data_type=pb.DataType.Value(dtype), dims=dims)
    if reshape is not None:
        message.reshape.SetInParent()  # present even when empty: a (B,) tensor's `shape: []`
        message.reshape.shape.extend(reshape)
    if optional:
        message.optional = True
    return message


def spec_tensor(tensor: TensorSpec, batched: bool, *, output: bool = False):
    dims, reshape = triton_dims(tensor, batched)
    return tensor_config(tensor.name, TRITON_DTYPES[tensor.dtype], dims, output=output,
                         reshape=reshape)


def base_config(name: str, *, backend: str = "", platform: str = "", max_batch_size: int = 0,
                instances: int = 1, kind: str = "KIND_CPU",
                parameters: dict[str, str] | None = None, gpus: tuple[int, ...] = ()):
    """A ModelConfig with what every model of ours sets; tensors are added by the caller."""
    pb = _model_config_pb2()
    cfg = pb.ModelConfig(name=name, backend=backend, platform=platform,
                         max_batch_size=max_batch_size)
    cfg.instance_group.add(count=instances, kind=pb.ModelInstanceGroup.Kind.Value(kind),
                           gpus=list(gpus))
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    return cfg


def config_text(cfg, header: str) -> str:
    """The config.pbtxt text of ModelConfig `cfg`: protobuf's own text format (values escaped,
    exactly what Triton parses), after `header` as comment lines."""
    from google.protobuf import text_format

    comments = "".join(f"# {line}\n" for line in header.splitlines())
    return comments + text_format.MessageToString(cfg)


_PLATFORMS = {"python": ("python", ""), "onnxruntime": ("", "onnxruntime_onnx"),
              "tensorrt": ("", "tensorrt_plan"), "openvino": ("openvino", "")}


def network_config(spec: ExportSpec, options: TritonOptions):
    """The ModelConfig of `spec` served by `options.backend`."""
    batched = spec.max_batch_size > 0
    backend, platform = _PLATFORMS[options.backend]
    cfg = base_config(options.name_prefix + spec.name, backend=backend, platform=platform,
                      max_batch_size=spec.max_batch_size if batched else 0,
                      instances=options.instances, kind=options.instance_kind,
                      parameters=_thread_parameters(spec, options), gpus=options.gpus)
    cfg.input.extend(spec_tensor(t, batched) for t in spec.inputs)
    cfg.output.extend(spec_tensor(t, batched, output=True) for t in spec.outputs)
    if spec.dynamic_batching and batched:
        cfg.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    if options.backend == "openvino":
        cfg.default_model_filename = "model.onnx"  # the backend reads ONNX as well as IR
    return cfg


def _thread_parameters(spec: ExportSpec, options: TritonOptions) -> dict[str, str]:
    if options.instance_kind != "KIND_CPU":
        return {}
    threads = str(options.threads)  # "0": decided at load from the cores there
    if options.backend == "python":
        # The model validates requests against the spec's ranges (export/python_backend.py).
        return {"intra_op_threads": threads, "limits": json.dumps(spec.serving_limits())}
    if options.backend == "openvino":  # Triton's openvino_backend names
        params = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if options.threads:
            params["INFERENCE_NUM_THREADS"] = threads
        if options.precision != "fp32":
            from export.openvino import resolve_precision

            if resolve_precision(options.precision) == "bf16":
                params["HINT_BF16"] = "YES"
        return params
    # onnxruntime_backend's names; execution_mode 0 = sequential
    return {"intra_op_thread_count": threads, "inter_op_thread_count": "1",
            "execution_mode": "0"}


def model_config(spec: ExportSpec, options: TritonOptions) -> str:
    """The config.pbtxt text for `spec` served by `options.backend`."""
    return config_text(network_config(spec, options),
                       "Written by export/build_engines.py from export/specs.py; do not edit "
                       "by hand.")
