"""A Stable Diffusion v1 checkpoint served in one command, like our own models.

A reduced SD v1 model (tests/fixtures/compvis_tiny_sd.yaml: CompVis's v1-inference.yaml
layout, CLIP text model shrunk) with random weights, written as SD's .ckpt files are (Lightning
layout, with the old `position_ids` buffer), goes through `python -m server --checkpoint
sd.ckpt --compvis-config ...`: export (the text encoder with CLIP's spec), parity, Triton, the
gateway. Its images over REST and over Triton gRPC are the in-process pipeline's.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml

from server.triton import free_ports
from tests.server.conftest import psnr
from tests.server.serving import decode_png
from tests.server.test_launcher import PROJECT_ROOT, Output, processes_mentioning

TINY_SD = PROJECT_ROOT / "tests" / "fixtures" / "compvis_tiny_sd.yaml"
PROMPT = "a photograph of an astronaut riding a horse"


def make_sd_checkpoint(path: Path):
    """The reduced SD model, prompt-sensitive (cross-attention and outputs scaled up), saved
    as SD v1 .ckpt files are; returns the model."""
    from ldm.compat import POSITION_IDS, ldm_config
    from ldm.models.diffusion import LatentDiffusion

    torch.manual_seed(0)
    model = LatentDiffusion(ldm_config(yaml.safe_load(TINY_SD.read_text())["model"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("model.") and (".attn2.to_v." in name or ".proj_out." in name
                                              or name.startswith("model.diffusion_model.out.2")):
                p.normal_(0, 0.3)
    state = {**model.state_dict(), POSITION_IDS: torch.arange(77)[None]}
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)
    return model.eval()


@pytest.fixture(scope="module")
def served_sd(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sd")
    model = make_sd_checkpoint(tmp / "sd-v1-tiny.ckpt")
    port, http_port, grpc_port, metrics_port = free_ports(4)
    repo = tmp / "model_repository"
    cmd = [sys.executable, "-m", "server", "--checkpoint", str(tmp / "sd-v1-tiny.ckpt"),
           "--compvis-config", str(TINY_SD), "--repository", str(repo),
           "--work-dir", str(tmp / "work"), "--port", str(port),
           "--triton-http-port", str(http_port), "--triton-grpc-port", str(grpc_port),
           "--triton-metrics-port", str(metrics_port), "--triton-log", str(tmp / "triton.log")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    out = Output(proc.stdout)
    try:
        url = out.wait_for(r"web UI:\s+(http://\S+)/", proc, timeout=300).group(1)
        yield model, url, f"127.0.0.1:{grpc_port}", repo
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
        for pid in processes_mentioning(str(repo)):  # leftovers of a failed test
            os.kill(pid, signal.SIGKILL)


def test_the_text_encoder_is_exported_with_clips_spec(served_sd):
    _, _, _, repo = served_sd
    manifest = json.loads((repo / "manifest.json").read_text())["models"]["text_encoder"]
    (inp,), (out,) = manifest["inputs"], manifest["outputs"]
    assert (inp["name"], inp["dtype"], inp["shape"][1:]) == ("input_ids", "int64", [77])
    assert (out["name"], out["shape"][1:]) == ("context", [77, 32])
    tokenizer = repo / "ldm_txt2img_stream" / "1" / "tokenizer"
    assert [p.name for p in tokenizer.iterdir()] == ["bpe_simple_vocab_16e6.txt.gz"]


def test_rest_and_grpc_images_are_the_in_process_images(served_sd):
    from ldm.pipeline import Txt2ImgPipeline
    from server.client import Txt2ImgClient

    model, url, grpc, _ = served_sd
    kw = dict(steps=4, guidance_scale=5.0, seed=11, sampler="ddim")
    want = Txt2ImgPipeline(model)([PROMPT], **kw)
    config = httpx.get(f"{url}/v1/config", timeout=10).json()
    assert config["limits"]["sizes"][0] == 32  # the default: 8x8 latents x f=4 (reduced model)
    r = httpx.post(f"{url}/v1/images/generations", timeout=120,
                   json={"prompt": PROMPT, "n": 1, **kw})
    assert r.status_code == 200, r.text
    rest = decode_png(r.json()["data"][0]["b64_json"])[None]
    with Txt2ImgClient(grpc, timeout=120) as client:
        over_grpc = client.generate(PROMPT, **kw).images
    np.testing.assert_array_equal(rest, over_grpc)
    # The default networks: OpenVINO, bf16 where the CPU has it (else fp32).
    assert psnr(rest, want) >= 35, psnr(rest, want)
    other = httpx.post(f"{url}/v1/images/generations", timeout=120,
                       json={"prompt": "a red square", "n": 1, **kw})
    assert psnr(decode_png(other.json()["data"][0]["b64_json"])[None], rest) < 30


def test_the_exported_graphs_give_the_in_process_image_at_fp32(served_sd):
    # The same repository's graphs on ONNX Runtime (fp32), in the served loop: the export of
    # every SD network, CLIP's text encoder included, is exact.
    from ldm.pipeline import Txt2ImgPipeline
    from server.contract import GenerationRequest, ServingOptions
    from server.networks import local_service
    from server.repository import read_pipeline_config

    model, _, _, repo = served_sd
    service = local_service(repo, ServingOptions(networks="onnxruntime", preview="none"), 2)
    kw = dict(steps=4, guidance_scale=5.0, seed=11, sampler="ddim")
    limits = read_pipeline_config(repo / "ldm_txt2img_stream")[0]
    req = GenerationRequest(prompt=PROMPT, num_images=1, **kw).resolve(limits)
    got = service.generate(req).images
    assert psnr(got, Txt2ImgPipeline(model)([PROMPT], **kw)) >= 40
