"""The pipeline's networks in this process: ONNX Runtime, OpenVINO or PyTorch.

With `networks: onnxruntime` or `networks: openvino` (ServingOptions) the pipeline model
opens the repository's own ONNX graphs, the same files the `text_encoder`, `unet` and
`vae_decoder` models serve, and calls them directly (OpenVINO compiles them, at fp32 or
bf16, into a cache that a restart reuses): no BLS round trip through the Triton core per
sampler step (measured: 3.6 ms of a 10 ms step on the demo model, bench/RESULTS.md). With
`networks: torch` it runs the PyTorch modules on `device` (server/torch_networks.py). The
weights are then resident in this process only: `python -m server` does not load the
component models (their own copy) unless asked to.

The loop (server/txt2img.py) calls tensor functions; the numpy functions of ONNX Runtime and
OpenVINO are wrapped by `host_function`, which runs on the CPU.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from server.contract import (
    ALPHAS_FILE,
    NETWORKS,
    PIPELINE_FILE,
    STREAM_SUFFIX,
    TOKENIZER_DIR,
    PipelineInfo,
    ServingOptions,
)

NumpyFn = Callable[..., np.ndarray]
TensorFn = Callable[..., torch.Tensor]
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


def host_function(fn: NumpyFn) -> TensorFn:
    """A numpy network as a tensor function on the CPU: tensors in, a tensor out."""
    def call(*tensors: torch.Tensor) -> torch.Tensor:
        out = fn(*(np.ascontiguousarray(t.cpu().numpy()) for t in tensors))
        return torch.from_numpy(np.asarray(out))

    return call


def local_networks(repository: str | Path, info: PipelineInfo, options: ServingOptions,
                   threads: int | None = None,
                   device: torch.device | None = None) -> dict[str, TensorFn]:
    """The networks `options.networks` (onnxruntime, openvino or torch) runs in this process,
    as tensor functions; torch ones on `device` (the CPU if None)."""
    if options.networks == "torch":
        from server.torch_networks import torch_networks

        device = device or torch.device("cpu")
        if device.type == "cpu" and threads:
            torch.set_num_threads(threads)  # the networks' threads, as ONNX Runtime's
        return torch_networks(repository, options.precision, device)
    if options.networks == "onnxruntime":
        fns = onnx_networks(repository, info, threads)
    elif options.networks == "openvino":
        fns = openvino_networks(repository, info, threads, options.precision,
                                openvino_cache_dir(options, repository))
    else:
        raise ValueError(f"networks {options.networks!r} are not run in process")
    return {name: host_function(fn) for name, fn in fns.items()}


def served_loop(folder: str | Path, networks: Callable[[PipelineInfo], dict[str, TensorFn]],
                options: ServingOptions, batcher=None, device: torch.device | None = None):
    """server.txt2img.Txt2ImgService from a pipeline model's version `folder` (pipeline.json,
    tokenizer, abar_t) and `networks(info)`, the tensor functions of its three networks on
    `device` (the CPU if None)."""
    from ldm.modules.conditioning import open_tokenizer
    from server.txt2img import Txt2ImgService

    folder = Path(folder)
    info = PipelineInfo.load(folder)
    fns = networks(info)
    tokenizer = open_tokenizer(folder / TOKENIZER_DIR, info.max_seq_len)
    return Txt2ImgService(info, np.load(folder / ALPHAS_FILE), tokenizer, fns["text_encoder"],
                          fns["unet"], fns["vae_decoder"], options, batcher,
                          device or torch.device("cpu"))


def local_service(repository: str | Path, options: ServingOptions, threads: int | None = None,
                  batcher=None):
    """What the served streaming model runs, with the networks `options.networks` runs in
    this process: for benchmarks and checks outside Triton."""
    device = loop_device(options)
    return served_loop(stream_model_dir(repository) / "1",
                       lambda info: local_networks(repository, info, options, threads, device),
                       options, batcher, device)


def stream_model_dir(repository: str | Path) -> Path:
    """The repository's streaming pipeline model (<name>_txt2img_stream), the one that runs
    the loop."""
    found = sorted(p for p in Path(repository).iterdir()
                   if p.name.endswith(STREAM_SUFFIX) and (p / "1" / PIPELINE_FILE).is_file())
    if len(found) != 1:
        raise FileNotFoundError(f"{repository}: expected one *{STREAM_SUFFIX} pipeline model, "
                                f"found {[p.name for p in found]}")
    return found[0]


def loop_device(options: ServingOptions, instance_gpu: int | None = None) -> torch.device:
    """Where the loop runs: `options.device`, except that ONNX Runtime and OpenVINO networks
    run on the host, and so does their loop."""
    from server.torch_networks import resolve_device

    if options.networks in ("onnxruntime", "openvino"):
        return torch.device("cpu")
    return resolve_device(options.device, instance_gpu)


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
