"""bench.report's UNet-step table against the GEMM peaks, for new results and old ones."""
from __future__ import annotations

import json
import math

from bench.report import gemm_peaks_of, percent_of_peak, render

PEAKS = {"n": 2048, "threads": 2, "tries": 5,
         "runs": {"torch/fp32": 210.0, "onnxruntime/fp32": 462.0, "onnxruntime/bf16": None},
         "skipped": {"onnxruntime/bf16": "no bf16 MatMul"},
         "fp32": {"gflops": 462.0, "runtime": "onnxruntime"},
         "bf16": {"gflops": 900.0, "runtime": "openvino"}}


def _result(**peak_keys) -> dict:
    """The smallest result `render` accepts: one UNet step of 46.2 GFLOP in 0.5 s."""
    meta = {"model": "m", "image_size": 32, "steps": 4, "guidance_scale": 5.0, "threads": 2,
            "cores": 2, "cpu": "cpu", "repetitions": 2, "warmup": 1, "requests_per_client": 1,
            "pipeline_instances": 1}
    step = {"n": 2, "median": 0.5, "p95": 0.6, "mean": 0.5, "min": 0.4, "max": 0.6,
            "flops": 46.2e9, "flops_by_op": {}}
    return {"meta": meta, "targets": [], "e2e": {}, "load": {}, "params": {},
            "unet_step": {"onnxruntime": step}, **peak_keys}


def test_percent_of_peak_uses_the_precisions_peak():
    assert percent_of_peak(231.0, "fp32", PEAKS) == 50.0
    assert percent_of_peak(450.0, "bf16", PEAKS) == 50.0
    assert math.isnan(percent_of_peak(450.0, "bf16", {**PEAKS, "bf16": None}))
    assert math.isnan(percent_of_peak(450.0, "bf16", {**PEAKS, "bf16": math.nan}))  # via JSON


def test_step_table_names_both_peaks_and_their_runtimes():
    text = render(_result(gemm_peaks=PEAKS), markdown=True)
    assert ("fp32 GEMM peak 462 GFLOP/s (onnxruntime), bf16 peak 900 GFLOP/s (openvino), "
            "2 thread(s), n=2048") in text
    assert "| ONNX Runtime (exported unet) | 500.00 | 600.00 | 46.200 | 92.4 | 20.0 |" in text


def test_missing_bf16_peak_survives_the_json_round_trip():
    result = json.loads(json.dumps(_result(gemm_peaks={**PEAKS, "bf16": None})))
    assert "bf16 peak n/a" in render(result, markdown=False)


def test_old_result_with_only_the_torch_peak_still_renders():
    old = {"n": 2048, "threads": 2, "best_s": 0.0867, "gflops": 198.0}
    result = _result(matmul_peak=old)
    assert gemm_peaks_of(result)["fp32"] == {"gflops": 198.0, "runtime": "torch"}
    text = render(result, markdown=True)
    assert "fp32 GEMM peak 198 GFLOP/s (torch), bf16 peak n/a" in text
    assert "| 92.4 | 46.7 |" in text
