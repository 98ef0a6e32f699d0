"""The pipeline's networks as numpy functions on ONNX Runtime or OpenVINO in this process.

With `networks: onnxruntime` or `networks: openvino` (ServingOptions) the pipeline model
opens the repository's own ONNX graphs, the same files the `text_encoder`, `unet` and
`vae_decoder` models serve, and calls them directly (OpenVINO compiles them, at fp32 or
bf16, into a cache that a restart reuses): no BLS round trip through the Triton core per
sampler step (measured: 3.6 ms of a 10 ms step on the demo model, bench/RESULTS.md). The
weights are then resident in this process only: `python -m server` does not load the
component models (their own copy) unless asked to.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.contract import (
    ALPHAS_FILE,
    NETWORKS,
    TOKENIZER_DIR,
    PipelineInfo,
    ServingOptions,
)

NumpyFn = Callable[..., np.ndarray]
OPENVINO_CACHE_DIR = ".openvino-cache"  # in the repository's folder: openvino_cache_dir


def onnx_function(path: str | Path, inputs: list[str], output: str,
                  threads: int | None = None) -> NumpyFn:
    """fn(*arrays) -> `output` of the graph at `path`, arrays given in `inputs` order. The
    pipeline runs one network at a time (server/batching.py), so its sessions share one
    memory arena: the process holds the largest run's activations, not each network's."""
    from export.ort import make_session  # here: BLS pipelines need no ONNX Runtime

    session = make_session(path, threads, shared_arena=True)
    names = [i.name for i in session.get_inputs()]
    if sorted(names) != sorted(inputs):
        raise ValueError(f"{path}: graph inputs {names}, pipeline.json says {inputs}")

    def call(*arrays: np.ndarray) -> np.ndarray:
        return session.run([output], dict(zip(inputs, arrays, strict=True)))[0]

    return call


def onnx_networks(repository: str | Path, info: PipelineInfo,
                  threads: int | None = None) -> dict[str, NumpyFn]:
    """{network name: numpy function} for the graphs pipeline.json names under `repository`,
    on ONNX Runtime."""
    return {name: onnx_function(path, *io, threads)
            for name, (path, io) in _graphs(repository, info).items()}


def openvino_networks(repository: str | Path, info: PipelineInfo, threads: int | None = None,
                      precision: str = "fp32",
                      cache_dir: str | Path | None = None) -> dict[str, NumpyFn]:
    """The same graphs compiled by OpenVINO at `precision` (fp32, bf16 or auto)."""
    from export.openvino import openvino_function

    return {name: openvino_function(path, *io, threads, precision, cache_dir)
            for name, (path, io) in _graphs(repository, info).items()}


def local_networks(repository: str | Path, info: PipelineInfo, options: ServingOptions,
                   threads: int | None = None) -> dict[str, NumpyFn]:
    """The networks `options.networks` (onnxruntime or openvino) runs in this process."""
    if options.networks == "onnxruntime":
        return onnx_networks(repository, info, threads)
    if options.networks == "openvino":
        return openvino_networks(repository, info, threads, options.precision,
                                 openvino_cache_dir(options, repository))
    raise ValueError(f"networks {options.networks!r} are not run in process")


def served_loop(folder: str | Path, networks: Callable[[PipelineInfo], dict[str, NumpyFn]],
                options: ServingOptions, batcher=None):
    """server.txt2img.Txt2ImgService from a pipeline model's version `folder` (pipeline.json,
    tokenizer, abar_t) and `networks(info)`, the numpy functions of its three networks."""
    from ldm.modules.conditioning import open_tokenizer
    from server.txt2img import Txt2ImgService

    folder = Path(folder)
    info = PipelineInfo.load(folder)
    fns = networks(info)
    tokenizer = open_tokenizer(folder / TOKENIZER_DIR, info.max_seq_len)
    return Txt2ImgService(info, np.load(folder / ALPHAS_FILE), tokenizer, fns["text_encoder"],
                          fns["unet"], fns["vae_decoder"], options, batcher)


def local_service(repository: str | Path, options: ServingOptions, threads: int | None = None,
                  batcher=None):
    """What the served streaming model runs, with the networks `options.networks` runs in
    this process: for benchmarks and checks outside Triton."""
    return served_loop(Path(repository) / "ldm_txt2img_stream" / "1",
                       lambda info: local_networks(repository, info, options, threads),
                       options, batcher)


def openvino_cache_dir(options: ServingOptions, repository: str | Path) -> Path:
    """Where OpenVINO keeps compiled networks: `openvino_cache`, else `.openvino-cache` inside
    the repository's folder. The build swaps in a new folder whenever a graph changes, so the
    cache holds the blobs of the graphs served now and goes with the folder it belongs to."""
    if options.openvino_cache:
        return Path(options.openvino_cache).expanduser()
    return Path(repository).resolve() / OPENVINO_CACHE_DIR


def _graphs(repository: str | Path, info: PipelineInfo) -> dict[str, tuple[Path, tuple]]:
    """{network: (ONNX path, (input names, output name))} from pipeline.json."""
    graphs = {}
    for name in NETWORKS:
        target = info.target(name)
        if not target.onnx:
            raise ValueError(f"pipeline.json names no ONNX file for {name} (a TensorRT "
                             "repository?): use networks=bls")
        graphs[name] = (Path(repository) / target.onnx, (target.inputs, target.output))
    return graphs
