"""The python-backend repository in a real Triton server (nvidia-pytriton's binary, CPU).

The server runs without this project on its PYTHONPATH: the repository must be
self-contained. Concurrent UNet requests must be merged by the dynamic batcher into fewer
executions, each answered with its own slice, equal to PyTorch.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from export.repository import BuildOptions, build_repository
from export.specs import GRAPHS
from export.triton_config import TritonOptions


@pytest.fixture(scope="module")
def server(tiny_ldm_dir, tmp_path_factory):
    from server.triton import TritonServer

    root = tmp_path_factory.mktemp("triton")
    # A long queue delay so that concurrent requests are certainly merged; 1 thread each
    # because the test machine's cores are shared.
    options = BuildOptions(triton=TritonOptions("python", max_queue_delay_us=300_000, threads=1),
                           models=("text_encoder", "unet"))
    build_repository(tiny_ldm_dir, root / "repo", options, work_dir=root / "work",
                     progress=False)
    # Neither PYTHONPATH nor the working folder ('' on the stub's sys.path) holds this project.
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with TritonServer(root / "repo", pythonpath=(), log_path=root / "triton.log",
                          extra_args=("--model-control-mode=explicit", "--load-model=unet",
                                      "--load-model=text_encoder")) as running:
            os.chdir(cwd)
            yield running
    finally:
        os.chdir(cwd)


def _input(name: str, array: np.ndarray) -> httpclient.InferInput:
    dtype = {np.float32: "FP32", np.int64: "INT64"}[array.dtype.type]
    x = httpclient.InferInput(name, list(array.shape), dtype)
    x.set_data_from_numpy(array)
    return x


def test_concurrent_unet_requests_are_batched_and_match_pytorch(server, tiny_model):
    rng = np.random.default_rng(0)
    sizes = [1, 2, 1, 3, 2, 1]
    requests = [{"latent": rng.standard_normal((n, 4, 4, 4)).astype(np.float32),
                 "timestep": rng.integers(0, 1000, (n, 1)).astype(np.int64),  # dims [1]
                 "context": rng.standard_normal((n, 77, 32)).astype(np.float32)}
                for n in sizes]
    client = httpclient.InferenceServerClient(server.http_url, concurrency=len(sizes))
    try:
        pending = [client.async_infer("unet", [_input(k, v) for k, v in r.items()])
                   for r in requests]
        results = [p.get_result().as_numpy("noise_pred") for p in pending]
        stats = client.get_inference_statistics("unet")["model_stats"][0]
    finally:
        client.close()
    unet = GRAPHS["unet"](tiny_model)
    for request, result in zip(requests, results, strict=True):
        with torch.no_grad():
            expected = unet(torch.from_numpy(request["latent"]),
                            torch.from_numpy(request["timestep"][:, 0]),
                            torch.from_numpy(request["context"])).numpy()
        assert result.shape == expected.shape
        assert np.abs(result - expected).max() <= 1e-4 * np.abs(expected).max()
    assert stats["inference_count"] == sum(sizes)
    print("unet statistics:", stats["inference_count"], "items in", stats["execution_count"],
          "executions")
    assert stats["execution_count"] < len(sizes)  # merged by dynamic batching + model.py


def test_text_encoder_result_and_per_request_error(server, tiny_model):
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 30522, (2, 77)).astype(np.int64)
    client = httpclient.InferenceServerClient(server.http_url)
    try:
        context = client.infer("text_encoder", [_input("input_ids", ids)]).as_numpy("context")
        bad = ids.copy()
        bad[0, 3] = 10**6  # beyond the vocabulary: refused before ONNX Runtime sees it
        with pytest.raises(InferenceServerException,
                           match=r"input_ids: value 1000000 is outside \[0, 30521\]") as e:
            client.infer("text_encoder", [_input("input_ids", bad)])
        assert e.value.status() == "400"  # INVALID_ARG, not INTERNAL
        big = {"latent": np.zeros((1, 4, 128, 128), np.float32),
               "timestep": np.zeros((1, 1), np.int64),
               "context": np.zeros((1, 77, 32), np.float32)}
        with pytest.raises(InferenceServerException, match="height 128 .* outside") as e:
            client.infer("unet", [_input(k, v) for k, v in big.items()])
        assert e.value.status() == "400"
        # The server is fine afterwards.
        again = client.infer("text_encoder", [_input("input_ids", ids)]).as_numpy("context")
    finally:
        client.close()
    with torch.no_grad():
        expected = GRAPHS["text_encoder"](tiny_model)(torch.from_numpy(ids)).numpy()
    assert np.abs(context - expected).max() <= 1e-4 * np.abs(expected).max()
    assert np.array_equal(again, context)
