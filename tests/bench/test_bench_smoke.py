"""`python -m bench --quick` end to end (tiny model, real Triton on loopback), and its FLOP count.

One bench run for the module (about 20-45 s on 2 cores, most of it the ONNX export and the
Triton start); the tests read its JSON and its printed table.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.flops import count_flops
from export.openvino import native_bf16

ROOT = Path(__file__).resolve().parents[2]
OPENVINO = ("openvino_fp32",) + (("openvino_bf16",) if native_bf16() else ())
E2E = ("pytorch_eager", "diffusers", "onnxruntime", "triton_http", *OPENVINO,
       *(f"triton_http_{v}" for v in OPENVINO))
STEP = ("pytorch_eager", "diffusers", "onnxruntime", *OPENVINO)
CLIENTS = ("1", "4", "8")
CPU_SDPA = "aten._scaled_dot_product_flash_attention_for_cpu"
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "latest.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--out", str(out),
         "--work-dir", str(tmp / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()), proc.stdout, out


@pytest.mark.slow
def test_every_contender_has_positive_numbers(run):
    result, _, _ = run
    reps = result["meta"]["repetitions"]
    assert reps == 2 and result["meta"]["steps"] == 4
    assert set(result["e2e"]) == set(E2E)
    for name in E2E:
        s = result["e2e"][name]
        assert s["n"] == reps and 0 < s["min"] <= s["median"] <= s["p95"] <= s["max"], name
    assert set(result["unet_step"]) == set(STEP)
    for name in STEP:
        s = result["unet_step"][name]
        assert s["n"] == reps and s["median"] > 0 and s["flops"] > 0, name
    assert set(result["load"]) == set(CLIENTS)
    for n in CLIENTS:
        s = result["load"][n]
        assert s["errors"] == 0, s["error_examples"]
        assert s["images_per_s"] > 0 and s["latency"]["median"] > 0
        assert s["latency"]["n"] == int(n) * reps  # one request per client per repetition
    assert result["matmul_peak"]["gflops"] > 0


@pytest.mark.slow
def test_unet_batches_count_guided_halves(run):
    """Guidance makes every UNet request a batch of 2; one client never has two in flight."""
    load = run[0]["load"]
    assert load["1"]["unet_avg_batch"] == 2.0
    assert load["1"]["unet_requests_per_execution"] == 1.0
    for n in ("4", "8"):
        assert 2.0 <= load[n]["unet_avg_batch"] <= 2 * int(n)
        assert load[n]["unet_avg_batch"] == pytest.approx(
            2 * load[n]["unet_requests_per_execution"])


@pytest.mark.slow
def test_diffusers_twin_is_the_same_network(run):
    result = run[0]
    for part, counts in result["params"].items():
        assert counts["ours"] == counts["diffusers"] > 0, part
    ours, theirs = result["unet_step"]["pytorch_eager"], result["unet_step"]["diffusers"]
    assert ours["flops"] == theirs["flops"]
    # Attention FLOPs of the tiny UNet (tests/fixtures/tiny_ldm.yaml) at the CFG batch B = 2:
    # each SpatialTransformer does q k^T and attn v for self- (L keys) and cross-attention
    # (77 keys), 2 * 2 * B * C * L * (L + 77) in all (heads x head size = C). Level 0 (C 32,
    # 4x4 = 16 tokens) has 1 input and 2 output transformers; the middle one has C 64, 2x2.
    want = 3 * 4 * 2 * 32 * 16 * (16 + 77) + 4 * 2 * 64 * 4 * (4 + 77)
    assert ours["flops_by_op"][CPU_SDPA] == want


@pytest.mark.slow
def test_served_paths_draw_the_eager_image(run):
    agreement = run[0]["agreement"]
    assert agreement["onnxruntime_vs_pytorch_eager_psnr_db"] >= 40
    assert agreement["triton_http_vs_pytorch_eager_psnr_db"] >= 40
    # OpenVINO fp32 draws the same image; bf16 a close one, in process and served alike.
    assert agreement["openvino_fp32_vs_pytorch_eager_psnr_db"] >= 40
    assert agreement["triton_http_openvino_fp32_vs_pytorch_eager_psnr_db"] >= 40
    if "openvino_bf16" in OPENVINO:
        assert agreement["openvino_bf16_vs_pytorch_eager_psnr_db"] >= 20
        assert (agreement["triton_http_openvino_bf16_vs_pytorch_eager_psnr_db"]
                == agreement["openvino_bf16_vs_pytorch_eager_psnr_db"])


@pytest.mark.slow
def test_targets_and_tables(run, capsys):
    result, stdout, out = run
    names = {t["name"] for t in result["targets"]}
    assert names == {"triton_vs_onnxruntime", "triton_vs_pytorch_eager", "triton_vs_diffusers",
                     "load_8_vs_1"}
    for t in result["targets"]:
        assert math.isfinite(t["value"]) and t["value"] > 0 and isinstance(t["met"], bool)
    assert "End to end" in stdout and "4 Triton, HTTP, 1 client" in stdout
    from bench.run import main

    assert main(["--render", str(out), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert "| contender | median ms |" in md and "| 5 Triton, 8 client(s) |" in md


def test_flop_count_includes_cpu_attention():
    """FlopCounterMode alone counts the CPU flash-attention kernel as 0 FLOPs."""
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 77, 8), torch.randn(2, 4, 77, 8)
    total, by_op = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert total == by_op[CPU_SDPA] == 2 * (2 * 2 * 4 * 16 * 77 * 8)
