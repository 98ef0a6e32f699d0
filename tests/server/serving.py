"""Helpers of the gateway, web page and launcher tests: a served repository, a running gateway.

The ONNX exports are cached in one folder per pytest session (`export_cache`), so the modules
that each build a repository from `served_ldm_dir` export the networks once.
"""
from __future__ import annotations

import base64
import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

# The test limits: streams of up to 1000 steps (for cancellation), 4 steps by default.
TEST_LIMITS = {"max_steps": 1000, "default_steps": 4}
MAX_BATCH = 4


def export_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "export-cache"


def build_served_repository(checkpoint: Path, out: Path, work_dir: Path) -> Path:
    """text_encoder, unet, vae_decoder on ONNX Runtime + the pipeline models (test limits)."""
    from export.repository import BuildOptions, build_repository
    from export.specs import ShapeLimits
    from export.triton_config import TritonOptions
    from server.repository import PipelineOptions, assemble

    limits = ShapeLimits(max_batch=MAX_BATCH)
    options = BuildOptions(models=("text_encoder", "unet", "vae_decoder"), limits=limits,
                           triton=TritonOptions(threads=1))
    build_repository(checkpoint, out, options, work_dir=work_dir, progress=False)
    assemble(out, PipelineOptions(instances=2, limits=TEST_LIMITS,
                                  serving={"preview": "latent", "max_concurrent": 4,
                                           # fp32 images equal to in-process ones
                                           "networks": "onnxruntime"}))
    return out


@contextlib.contextmanager
def served_triton(checkpoint: Path, tmp_path_factory):
    """A TritonServer (free ports) on a repository built by `build_served_repository`."""
    from server.triton import TritonServer

    tmp = tmp_path_factory.mktemp("triton")
    repo = build_served_repository(checkpoint, tmp / "model_repository",
                                   export_cache(tmp_path_factory))
    with TritonServer(repo, log_path=tmp / "tritonserver.log") as server:
        yield server


@contextlib.contextmanager
def running_gateway(settings, host: str = "127.0.0.1") -> Iterator[str]:
    """The gateway app served by uvicorn in a thread on a free port; yields its base URL."""
    from server.gateway import GatewayThread, create_app
    from server.triton import free_port

    gateway = GatewayThread(create_app(settings), host=host, port=free_port(),
                            log_level="warning").start()
    try:
        yield gateway.url
    finally:
        gateway.stop()


def decode_png(b64: str) -> np.ndarray:
    """A base64 PNG -> (H, W, 3) uint8, checking that it really is a PNG."""
    from PIL import Image

    raw = base64.b64decode(b64, validate=True)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(raw)) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def unet_counts(server) -> tuple[int, int]:
    """(executions, calls) of the UNet so far, summed over the pipeline models: the counters
    their in-process batcher publishes on Triton's /metrics (server/bls.py)."""
    from server.batching import parse_network_metrics

    unet = [v for (_, network), v in parse_network_metrics(httpx.get(server.metrics_url).text)
            .items() if network == "unet"]
    return (int(sum(v.get("ldm_network_executions_total", 0) for v in unet)),
            int(sum(v.get("ldm_network_calls_total", 0) for v in unet)))


def settled_unet_calls(server, t0: float, limit: float, quiet: float = 1.5) -> int:
    """The UNet call count once it has not changed for `quiet` s (a cancelled loop has
    stopped); fails when that is not so `limit` s after `t0`."""
    import time

    last, stable_since = -1, time.monotonic()
    while time.monotonic() - stable_since < quiet:
        _, now = unet_counts(server)
        if now != last:
            last, stable_since = now, time.monotonic()
        assert time.monotonic() - t0 < limit, "unet kept running after the cancel"
        time.sleep(0.1)
    return last


def read_sse(response: httpx.Response) -> Iterator[tuple[str, dict]]:
    """(event, data) pairs of a server-sent-event response, parsed by the spec's rules."""
    import json

    event, data = "message", []
    for line in response.iter_lines():
        if line == "":
            if data:
                yield event, json.loads("\n".join(data))
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)
