"""bench.precision on the demo model, a few captions: every runtime judged, bf16 compared."""
from __future__ import annotations

import json

from bench.precision import main, verdict
from export.openvino import native_bf16


def test_runtimes_are_judged_and_compared(tmp_path, capsys):
    runtimes = "onnxruntime_fp32,openvino_fp32" + (",openvino_bf16" if native_bf16() else "")
    assert main(["--seeds", "1", "--captions", "6", "--work-dir", str(tmp_path / "work"),
                 "--runtimes", runtimes, "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "p.json").read_text())["results"]
    assert result["onnxruntime_fp32"]["psnr_vs_onnxruntime_fp32"] == 100.0
    assert result["openvino_fp32"]["psnr_vs_onnxruntime_fp32"] >= 40  # same arithmetic
    for r in result.values():
        assert all(0 <= v <= 1 for v in r["accuracy"].values())
    assert "| openvino_fp32 |" in out and "(6 images each" in out


def test_the_rule_is_one_point_on_every_attribute():
    def acc(c, s, p, a):
        return {"accuracy": {"color": c, "shape": s, "position": p, "all": a}}

    fp32 = acc(0.99, 0.93, 1.0, 0.92)
    assert "meets" in verdict({"openvino_fp32": fp32, "openvino_bf16": acc(0.98, 0.93, 1.0,
                                                                           0.915)})
    assert "misses the rule: largest drop +0.0200 (shape)" in verdict(
        {"openvino_fp32": fp32, "openvino_bf16": acc(0.99, 0.91, 1.0, 0.92)})
