"""Request merging of the Python-backend model, outside Triton, on the tiny ONNX graphs."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from export.python_backend import (
    InferenceError,
    OnnxBatchModel,
    RequestError,
    instance_count,
    threads_for,
)
from export.specs import GRAPHS


class CountingModel(OnnxBatchModel):
    """Records the batch sizes of the ONNX Runtime calls actually made."""

    def __init__(self, path):
        super().__init__(path, threads=1)
        self.calls: list[int] = []

    def _run(self, arrays):
        self.calls.append(next(iter(arrays.values())).shape[0])
        return super()._run(arrays)


def unet_request(rng, batch, size=4, timestep_shape=None):
    t = rng.integers(0, 1000, batch).astype(np.int64)
    return {"latent": rng.standard_normal((batch, 4, size, size)).astype(np.float32),
            "timestep": t if timestep_shape is None else t.reshape(timestep_shape),
            "context": rng.standard_normal((batch, 77, 32)).astype(np.float32)}


def torch_unet(model, request):
    with torch.no_grad():
        args = [torch.from_numpy(np.asarray(request[k])) for k in ("latent", "timestep",
                                                                    "context")]
        args[1] = args[1].reshape(-1)
        return GRAPHS["unet"](model)(*args).numpy()


def test_requests_are_merged_per_shape_and_split_back(tiny_model, tiny_onnx):
    rng = np.random.default_rng(0)
    requests = [unet_request(rng, 1), unet_request(rng, 2), unet_request(rng, 1, size=8),
                unet_request(rng, 3), unet_request(rng, 2, size=8)]
    model = CountingModel(tiny_onnx["unet"])
    results = model.run_requests(requests)
    # Two shape groups (4x4: 1+2+3 items, 8x8: 1+2), one ONNX Runtime call each.
    assert sorted(model.calls) == [3, 6]
    for request, result in zip(requests, results, strict=True):
        expected = torch_unet(tiny_model, request)
        assert result["noise_pred"].shape == expected.shape
        err = np.abs(result["noise_pred"] - expected).max() / np.abs(expected).max()
        assert err < 1e-4


def test_timestep_as_b_by_1_is_accepted(tiny_model, tiny_onnx):
    request = unet_request(np.random.default_rng(1), 2, timestep_shape=(2, 1))
    [result] = OnnxBatchModel(tiny_onnx["unet"], threads=1).run_requests([request])
    expected = torch_unet(tiny_model, request)
    assert np.abs(result["noise_pred"] - expected).max() < 1e-4 * np.abs(expected).max()


def test_bad_requests_get_their_own_errors(tiny_onnx):
    rng = np.random.default_rng(2)
    good = unet_request(rng, 2)
    missing = {k: v for k, v in unet_request(rng, 1).items() if k != "context"}
    wrong_dtype = {**unet_request(rng, 1), "timestep": np.zeros(1, np.int32)}
    wrong_tokens = {**unet_request(rng, 1), "context": np.zeros((1, 76, 32), np.float32)}
    mixed_batch = {**unet_request(rng, 2), "timestep": np.zeros(3, np.int64)}
    extra = {**unet_request(rng, 1), "guidance": np.zeros(1, np.float32)}
    model = CountingModel(tiny_onnx["unet"])
    results = model.run_requests([missing, good, wrong_dtype, wrong_tokens, mixed_batch, extra])
    assert model.calls == [2]
    assert isinstance(results[1], dict) and results[1]["noise_pred"].shape == (2, 4, 4, 4)
    errors = [results[i] for i in (0, 2, 3, 4, 5)]
    assert all(isinstance(e, RequestError) for e in errors)
    messages = [str(e) for e in errors]
    assert "missing input(s) ['context']" in messages[0]
    assert "timestep: dtype int32, expected int64" in messages[1]
    assert "context: size 76 on axis 1, expected 77" in messages[2]
    assert "batch 3 differs" in messages[3]
    assert "unknown input(s) ['guidance']" in messages[4]


def test_a_failing_merged_run_is_retried_per_request(tiny_model, tiny_onnx):
    """An out-of-vocabulary token id fails ONNX Runtime's Gather for the whole merged batch;
    only the request that sent it may get the error."""
    rng = np.random.default_rng(3)
    ids = [rng.integers(0, 30522, (n, 77)).astype(np.int64) for n in (1, 2, 1)]
    ids[1][1, 5] = 10**6  # beyond vocab_size
    model = CountingModel(tiny_onnx["text_encoder"])
    results = model.run_requests([{"input_ids": x} for x in ids])
    assert model.calls == [4, 1, 2, 1]  # merged, then one by one
    # Without limits nothing catches it before ONNX Runtime: an internal error, no raw text.
    assert isinstance(results[1], InferenceError) and str(results[1]) == (
        "inference failed: InvalidArgument")
    encoder = GRAPHS["text_encoder"](tiny_model)
    for i in (0, 2):
        with torch.no_grad():
            expected = encoder(torch.from_numpy(ids[i])).numpy()
        assert np.abs(results[i]["context"] - expected).max() < 1e-4 * np.abs(expected).max()


def test_requests_outside_the_spec_are_refused_before_onnx_runtime(tiny_model, tiny_onnx):
    from export.specs import build_specs

    specs = build_specs(tiny_model.config)
    unet = OnnxBatchModel(tiny_onnx["unet"], 1, specs["unet"].serving_limits())
    rng = np.random.default_rng(5)
    lo, _, hi = specs["unet"].profile["height"]
    big = unet_request(rng, 1, size=hi * 16)
    late = unet_request(rng, 1)
    late["timestep"][0] = 1000
    fine = unet_request(rng, 2)
    results = unet.run_requests([big, late, fine])
    assert isinstance(results[0], RequestError)
    assert f"height {hi * 16} on axis 2 is outside what the model was built for: {lo}..{hi}" \
        in str(results[0])
    assert "timestep: value 1000 is outside [0, 999]" in str(results[1])
    assert results[2]["noise_pred"].shape == (2, 4, 4, 4)
    text = OnnxBatchModel(tiny_onnx["text_encoder"], 1,
                          specs["text_encoder"].serving_limits())
    for bad, shown in ((30522, "30522"), (-1, "-1"), (2**62, str(2**62))):
        ids = rng.integers(0, 30522, (1, 77)).astype(np.int64)
        ids[0, 7] = bad
        (result,) = text.run_requests([{"input_ids": ids}])
        assert isinstance(result, RequestError)
        assert f"input_ids: value {shown} is outside [0, 30521]" in str(result)


def test_instance_count_sums_the_groups():
    assert instance_count({"instance_group": [{"count": 2}, {"count": 3, "kind": "KIND_CPU"}]}) == 5
    assert instance_count({"instance_group": [{"kind": "KIND_CPU"}]}) == 1  # count defaults to 1
    assert instance_count({}) == 1


def test_threads_for():
    import os

    cores = len(os.sched_getaffinity(0))
    assert threads_for("3", 2) == 3
    assert threads_for("0", 1) == cores
    assert threads_for(None, 2) == max(1, cores // 2)
    assert threads_for("", 64) == 1


def test_empty_batch_is_an_error(tiny_onnx):
    [result] = OnnxBatchModel(tiny_onnx["text_encoder"], threads=1).run_requests(
        [{"input_ids": np.zeros((0, 77), np.int64)}])
    with pytest.raises(RequestError, match="empty batch"):
        raise result
