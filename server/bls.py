"""Triton glue of the pipeline models: BLS calls, request inputs, response tensors, errors.

Imported only inside Triton's Python-backend stub (it needs `triton_python_backend_utils`);
the logic it wires up lives in `server.contract` and `server.txt2img` and is tested without
Triton. The `model.py` files of `ldm_txt2img` and `ldm_txt2img_stream` are a few lines each
on top of this module.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from server.batching import NETWORK_METRICS, CallBatcher
from server.contract import (
    NETWORKS,
    InvalidRequest,
    Limits,
    NetworkTarget,
    PipelineInfo,
    ServingOptions,
    check_parameters,
    config_parameters,
)
from server.networks import loop_device, served_loop
from server.txt2img import Cancelled, Progress, Result, Txt2ImgService

log = logging.getLogger(__name__)

def to_torch(tensor) -> torch.Tensor:
    """A pb_utils.Tensor as a torch tensor where it lives: host memory as a CPU tensor, GPU
    memory left on its GPU (DLPack, no copy)."""
    if tensor.is_cpu():
        return torch.from_numpy(tensor.as_numpy())
    return torch.from_dlpack(tensor.to_dlpack())


def from_torch(name: str, t: torch.Tensor):
    """A torch tensor as a pb_utils.Tensor: GPU tensors by DLPack (they stay on the GPU)."""
    if t.is_cuda:
        return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(t.contiguous()))
    return pb_utils.Tensor(name, np.ascontiguousarray(t.numpy()))


def bls_function(target: NetworkTarget, device: torch.device) -> Callable[..., torch.Tensor]:
    """A tensor function calling model `target.model` through BLS. Its outputs are asked for
    in `device`'s memory: on a GPU loop the latents never leave the GPU, and a CPU loop needs
    no CUDA context to read GPU models' outputs."""
    model, names, output = target.model, target.inputs, target.output
    unsqueeze = set(target.unsqueeze)
    memory = _preferred_memory(device)

    def call(*tensors: torch.Tensor) -> torch.Tensor:
        inputs = [from_torch(name, t.unsqueeze(-1) if name in unsqueeze else t)
                  for name, t in zip(names, tensors, strict=True)]
        extra = {} if memory is None else {"preferred_memory": memory}
        response = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=[output], inputs=inputs, **extra).exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return to_torch(pb_utils.get_output_tensor_by_name(response, output)).to(device)

    return call


def _preferred_memory(device: torch.device):
    """pb_utils.PreferredMemory for outputs on `device` (None on Python backends without it)."""
    if not hasattr(pb_utils, "PreferredMemory"):
        return None
    if device.type == "cuda":
        return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_GPU, device.index or 0)
    return pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)


def network_metrics(model: str) -> Callable[[str, list[int], int, float], None] | None:
    """`CallBatcher.on_run` feeding the `server.batching.NETWORK_METRICS` counters on Triton's
    /metrics endpoint, labelled {model, network}; None where the Python backend has no custom
    metrics."""
    if not hasattr(pb_utils, "MetricFamily"):
        return None
    try:
        families = [pb_utils.MetricFamily(name, text, pb_utils.MetricFamily.COUNTER)
                    for name, text in NETWORK_METRICS.items()]
    except Exception as e:  # noqa: BLE001 - metrics are optional, serving is not
        log.warning("no network metrics: %s", e)
        return None
    metrics: dict[str, list] = {}

    def on_run(network: str, sizes: list[int], calls: int, seconds: float) -> None:
        if network not in metrics:
            labels = {"model": model, "network": network}
            metrics[network] = [f.Metric(labels) for f in families]
        runs, items, merged, micros = metrics[network]
        runs.increment(len(sizes))
        items.increment(sum(sizes))
        merged.increment(calls)
        micros.increment(seconds * 1e6)

    on_run.families = families  # they must outlive their metrics
    return on_run


def load_service(args: dict) -> tuple[Txt2ImgService, Limits, ServingOptions]:
    """Everything `initialize` needs, from the model's config and its version folder."""
    config = json.loads(args["model_config"])
    params = config_parameters(config)
    check_parameters(params)
    limits = Limits.from_parameters(params)
    options = ServingOptions.from_parameters(params)
    torch.set_num_threads(options.torch_threads)
    folder = Path(args["model_repository"]) / args["model_version"]
    device = loop_device(options, _instance_gpu(args))
    batcher = None
    if options.networks != "bls":
        # Imported here: with BLS (TensorRT) the stub needs no ONNX Runtime.
        from export.python_backend import instance_count, threads_for
        from server.networks import local_networks

        threads = threads_for(options.intra_op_threads, instance_count(config))
        repository = Path(args["model_repository"]).parent

        def networks(info: PipelineInfo) -> dict:
            return local_networks(repository, info, options, threads, device)

        batcher = CallBatcher(options.batch_wait_ms / 1000,
                              on_run=network_metrics(config.get("name", "")))
    else:
        def networks(info: PipelineInfo) -> dict:
            return {name: bls_function(info.target(name), device) for name in NETWORKS}
    service = served_loop(folder, networks, options, batcher, device)
    log.info("%s ready: networks %s on %s, limits %s", config.get("name"), options.networks,
             device, limits)
    return service, limits, options


def _instance_gpu(args: dict) -> int | None:
    """The GPU of a KIND_GPU instance (None for CPU instances)."""
    if args.get("model_instance_kind") != "GPU":
        return None
    return int(args.get("model_instance_device_id", 0))


def read_inputs(request) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in request.inputs()}


class Unavailable(RuntimeError):
    """The model cannot take this request now (it is being unloaded); try again."""


def error_for(exc: BaseException):
    """The TritonError for an exception: bad values are the client's, the rest are ours."""
    if isinstance(exc, InvalidRequest):
        return _error(str(exc), "INVALID_ARG")
    if isinstance(exc, Cancelled):
        return _error(str(exc), "CANCELLED")
    if isinstance(exc, Unavailable):
        return _error(str(exc), "UNAVAILABLE")
    log.exception("request failed", exc_info=exc)
    return _error(f"internal error: {type(exc).__name__}: {exc}", "INTERNAL")


def _error(message: str, code: str):
    # Looked up per call: the stub adds TritonError to pb_utils only after importing model.py.
    value = getattr(pb_utils.TritonError, code, None)
    if value is None:  # older Python backends: message only
        return pb_utils.TritonError(message)
    return pb_utils.TritonError(message, value)


def result_tensors(result: Result) -> list:
    return [
        pb_utils.Tensor("images", np.ascontiguousarray(result.images)),
        pb_utils.Tensor("warnings", np.array([w.encode() for w in result.warnings],
                                             dtype=np.object_)),
        pb_utils.Tensor("used_seed", np.array([result.seed], dtype=np.int64)),
    ]


def progress_tensors(progress: Progress) -> list:
    tensors = [pb_utils.Tensor("step", np.array([progress.step], dtype=np.int32)),
               pb_utils.Tensor("total", np.array([progress.total], dtype=np.int32))]
    if progress.preview is not None:
        tensors.append(pb_utils.Tensor("preview", np.ascontiguousarray(progress.preview)))
    return tensors
