"""The pipeline's networks as numpy functions on ONNX Runtime sessions in this process.

With `networks: onnxruntime` (ServingOptions) the pipeline model opens the repository's own
ONNX graphs, the same files the `text_encoder`, `unet` and `vae_decoder` models serve, and
calls them directly: no BLS round trip through the Triton core per sampler step (measured:
3.6 ms of a 10 ms step on the demo model, bench/RESULTS.md). The weights are then resident
in this process only: `python -m server` does not load the component models (their own
copy) unless asked to.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from export.ort import make_session
from server.contract import NETWORKS, PipelineInfo

NumpyFn = Callable[..., np.ndarray]


def onnx_function(path: str | Path, inputs: list[str], output: str,
                  threads: int | None = None) -> NumpyFn:
    """fn(*arrays) -> `output` of the graph at `path`, arrays given in `inputs` order. The
    pipeline runs one network at a time (server/batching.py), so its sessions share one
    memory arena: the process holds the largest run's activations, not each network's."""
    session = make_session(path, threads, shared_arena=True)
    names = [i.name for i in session.get_inputs()]
    if sorted(names) != sorted(inputs):
        raise ValueError(f"{path}: graph inputs {names}, pipeline.json says {inputs}")

    def call(*arrays: np.ndarray) -> np.ndarray:
        return session.run([output], dict(zip(inputs, arrays, strict=True)))[0]

    return call


def onnx_networks(repository: str | Path, info: PipelineInfo,
                  threads: int | None = None) -> dict[str, NumpyFn]:
    """{network name: numpy function} for the graphs pipeline.json names under `repository`."""
    fns = {}
    for name in NETWORKS:
        target = info.target(name)
        if not target.onnx:
            raise ValueError(f"pipeline.json names no ONNX file for {name} (a TensorRT "
                             "repository?): use networks=bls")
        path = Path(repository) / target.onnx
        fns[name] = onnx_function(path, target.inputs, target.output, threads)
    return fns
