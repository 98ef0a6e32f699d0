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
from server.networks import served_loop
from server.txt2img import Cancelled, Progress, Result, Txt2ImgService

log = logging.getLogger(__name__)

def to_numpy(tensor) -> np.ndarray:
    """A pb_utils.Tensor as a host array (BLS outputs of GPU models may live on the GPU)."""
    if tensor.is_cpu():
        return tensor.as_numpy()
    return torch.from_dlpack(tensor.to_dlpack()).cpu().numpy()


def bls_function(target: NetworkTarget) -> Callable[..., np.ndarray]:
    """A numpy function calling model `target.model` through BLS."""
    model, names, output = target.model, target.inputs, target.output
    unsqueeze = set(target.unsqueeze)

    def call(*arrays: np.ndarray) -> np.ndarray:
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(a[..., None] if name in unsqueeze
                                                               else a))
                   for name, a in zip(names, arrays, strict=True)]
        response = pb_utils.InferenceRequest(
            model_name=model, requested_output_names=[output], inputs=tensors).exec()
        if response.has_error():
            raise RuntimeError(f"{model}: {response.error().message()}")
        return to_numpy(pb_utils.get_output_tensor_by_name(response, output))

    return call


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
    batcher = None
    if options.networks != "bls":
        # Imported here: with BLS (TensorRT) the stub needs no ONNX Runtime.
        from export.python_backend import instance_count, threads_for
        from server.networks import local_networks

        threads = threads_for(options.intra_op_threads, instance_count(config))
        repository = Path(args["model_repository"]).parent

        def networks(info: PipelineInfo) -> dict:
            return local_networks(repository, info, options, threads)

        batcher = CallBatcher(options.batch_wait_ms / 1000,
                              on_run=network_metrics(config.get("name", "")))
    else:
        def networks(info: PipelineInfo) -> dict:
            return {name: bls_function(info.target(name)) for name in NETWORKS}
    service = served_loop(folder, networks, options, batcher)
    log.info("%s ready: networks %s, limits %s", config.get("name"), options.networks, limits)
    return service, limits, options


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
