"""bench.scale end to end on the tiny CompVis config: a Lightning 1.4 `.ckpt` written without
Lightning, loaded, drawn in process, exported, served by `python -m server --checkpoint ...
--compvis-config ...`, and drawn again over HTTP and gRPC streaming (the paper-scale trial's
every piece, in about a minute)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "tests" / "fixtures" / "compvis_tiny_txt2img.yaml"


def test_scale_trial_on_the_tiny_config(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.scale", "--config", str(CONFIG),
                        "--work", str(tmp_path), "--size", "32", "--steps", "3",
                        "--load-steps", "2"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    # The checkpoint: Lightning 1.4's layout, and no tensor all zeros.
    from ldm.checkpoints import LIGHTNING_GLOBALS

    with torch.serialization.safe_globals(list(LIGHTNING_GLOBALS)):
        raw = torch.load(tmp_path / "model.ckpt", weights_only=True, mmap=True)
    key = next(iter(raw["callbacks"]))  # the class itself, as Lightning 1.4 keyed it
    assert isinstance(key, type) and key.__qualname__ == "ModelCheckpoint"
    assert raw["pytorch-lightning_version"] == "1.4.2"
    assert all(t.any() for t in raw["state_dict"].values() if t.is_floating_point())
    serve = results["serve"]
    assert serve["http_psnr"] >= 40 and serve["grpc_stream_psnr"] >= 40
    # Served: the launcher, tritonserver and the two pipeline stubs, no component models.
    names = {k.rsplit(" (", 1)[0] for k in serve["rss_after_load"]}
    assert {"tritonserver", "stub ldm_txt2img", "stub ldm_txt2img_stream"} <= names
    assert not any(n.startswith("stub unet") for n in names)
    assert results["load"]["ckpt_tensor_bytes"] == results["checkpoint"]["tensor_bytes"]
    assert results["ort_step"]["ort_unet_step_s"] > 0 and results["inproc"]["unet_flops"] > 0
    assert "| load (`load_compvis`) |" in r.stdout and "UNet step at batch 2" in r.stdout

    # The runtimes trial on the same files: eager, ONNX Runtime fp32, OpenVINO fp32 and bf16,
    # in process and served, with the GEMM peaks.
    r = subprocess.run([sys.executable, "-m", "bench.scale_runtimes", "--config", str(CONFIG),
                        "--work", str(tmp_path), "--size", "32", "--steps", "3"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    runtimes = json.loads((tmp_path / "runtimes.json").read_text())
    assert runtimes["psnr"]["openvino_fp32"] >= 40 and runtimes["psnr"]["eager"] >= 40
    assert runtimes["psnr"]["served_onnxruntime_fp32"] == 100.0  # served = in process
    assert all(v["unet_step_s"] > 0 for v in runtimes["served"].values())
    assert runtimes["peaks"]["peaks"]["fp32"]["gflops"] > 0
    assert "| openvino_bf16 |" in r.stdout and "served bf16 image / PyTorch eager" in r.stdout
