"""bench.flops' GEMM peaks: every runtime really multiplies, in the precision it claims, and
the peak is the best of them (real torch, ONNX Runtime and OpenVINO; small matrices)."""
from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest

from bench.flops import (
    BUILDERS,
    PRECISIONS,
    GemmUnavailable,
    gemm_inputs,
    gemm_peaks,
    gemm_product,
    main,
    torch_matmul_peak,
)

INSTALLED = [r for r in BUILDERS if importlib.util.find_spec(r) is not None]
# Error relative to the product's largest element: elementwise relative error is meaningless
# for the elements that nearly cancel to 0.
RTOL = {"fp32": 1e-4, "bf16": 2e-2}


@pytest.fixture(scope="module")
def peaks() -> dict:
    return gemm_peaks(threads=1, n=256, tries=2)


def test_every_installed_runtime_measures_fp32(peaks):
    assert {"torch", "onnxruntime", "openvino"} <= set(INSTALLED)  # what the project ships
    for runtime in INSTALLED:
        g = peaks["runs"][f"{runtime}/fp32"]
        assert g is not None and math.isfinite(g) and g > 0, (runtime, peaks["skipped"])


def test_each_run_is_a_number_or_a_reason(peaks):
    assert set(peaks["runs"]) == {f"{r}/{p}" for r in BUILDERS for p in PRECISIONS}
    for key, g in peaks["runs"].items():
        if g is None:
            assert peaks["skipped"][key], key
        else:
            assert math.isfinite(g) and g > 0 and key not in peaks["skipped"], key


def test_onnxruntime_bf16_is_skipped_with_the_reason(peaks):
    assert peaks["runs"]["onnxruntime/bf16"] is None
    assert "no bf16 MatMul" in peaks["skipped"]["onnxruntime/bf16"]


@pytest.mark.parametrize("precision", PRECISIONS)
def test_peak_is_the_best_run_and_names_its_runtime(peaks, precision):
    done = {k: g for k, g in peaks["runs"].items() if k.endswith(precision) and g is not None}
    if not done:
        assert peaks[precision] is None
        return
    best = max(done, key=done.__getitem__)
    assert peaks[precision] == {"gflops": done[best], "runtime": best.split("/")[0]}
    assert peaks["n"] == 256 and peaks["threads"] == 1


def test_torch_matmul_peak_keeps_the_old_shape(peaks):
    old = torch_matmul_peak(peaks)
    assert set(old) == {"n", "threads", "best_s", "gflops"}
    assert old["gflops"] == peaks["runs"]["torch/fp32"]
    assert old["best_s"] == pytest.approx(2 * 256**3 / old["gflops"] / 1e9)


# ONNX Runtime has no bf16 GEMM on the CPU: test_onnxruntime_bf16_product_is_unavailable.
PRODUCTS = [(r, p) for r in BUILDERS for p in PRECISIONS if (r, p) != ("onnxruntime", "bf16")]


@pytest.mark.parametrize("runtime, precision", PRODUCTS)
def test_product_is_right(runtime, precision):
    if runtime not in INSTALLED:
        pytest.skip(f"{runtime} not installed")
    a, b = gemm_inputs(96, seed=1)
    try:
        c = gemm_product(runtime, precision, a, b, threads=1)
    except GemmUnavailable as e:
        assert precision == "bf16", e  # every runtime here has an fp32 GEMM
        pytest.skip(str(e))  # a CPU without native bf16
    ref = a.astype(np.float64) @ b.astype(np.float64)
    assert c.shape == ref.shape and c.dtype == np.float32
    error = float(np.abs(c - ref).max() / np.abs(ref).max())
    assert error <= RTOL[precision], (runtime, precision, error)
    if precision == "bf16":  # really bf16, not an fp32 run under that name
        assert error > 1e-4, (runtime, error)


def test_onnxruntime_bf16_product_is_unavailable():
    a, b = gemm_inputs(8)
    with pytest.raises(GemmUnavailable, match="no bf16 MatMul"):
        gemm_product("onnxruntime", "bf16", a, b)


def test_main_prints_the_table(capsys):
    assert main(["--n", "128", "--tries", "1"]) == 0
    out = capsys.readouterr().out
    assert "| runtime | precision | GFLOP/s | note |" in out
    for runtime in INSTALLED:
        assert f"| {runtime} | fp32 | " in out
    assert "| onnxruntime | bf16 | skipped |" in out
    assert "fp32 peak: " in out and "GFLOP/s (" in out
