"""End to end against a real Triton server (nvidia-pytriton's binary, loopback, free ports).

The repository is built by export/repository.py (text_encoder, unet, vae_decoder on ONNX
Runtime in Python-backend models) from a tiny prompt-sensitive LDM, plus our pipeline models
rewritten with test limits (streams of up to 1000 steps, for cancellation). One server for
the whole module.
"""
from __future__ import annotations

import contextlib
import json
import re
import threading
import time

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient

from server.client import StreamProgress, Txt2ImgClient, Txt2ImgError, Txt2ImgOutput, main
from server.triton import TritonServer
from tests.server.conftest import psnr
from tests.server.serving import settled_unet_calls, unet_counts

PROMPT = "a red circle in the top left"
MAX_BATCH = 4


@pytest.fixture(scope="module")
def served_model(served_ldm_dir):
    from ldm.pretrained import load_pretrained

    return load_pretrained(served_ldm_dir)


@pytest.fixture(scope="module")
def repository(served_ldm_dir, served_model, tmp_path_factory):
    from export.repository import BuildOptions, build_repository
    from export.specs import ShapeLimits
    from export.triton_config import TritonOptions
    from server.repository import PipelineOptions, assemble

    tmp = tmp_path_factory.mktemp("triton")
    out = tmp / "model_repository"
    limits = ShapeLimits(max_batch=MAX_BATCH)
    options = BuildOptions(models=("text_encoder", "unet", "vae_decoder"), limits=limits,
                           triton=TritonOptions(threads=1))
    build_repository(served_ldm_dir, out, options, work_dir=tmp / "work", progress=False)
    assert not (out / "ldm_txt2img").exists()  # the export writes the networks only
    assert assemble(out, PipelineOptions(
        instances=2, limits={"max_steps": 1000, "default_steps": 4},
        serving={"preview": "latent", "max_concurrent": 4, "networks": "onnxruntime"})) == [
            "ldm_txt2img", "ldm_txt2img_stream"]
    return out


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    with TritonServer(repository, log_path=log) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    with Txt2ImgClient(server.grpc_url, timeout=60) as c:
        yield c


def test_grpc_and_http_inference(server, client):
    out = client.generate(PROMPT, seed=5, steps=4, num_images=2)
    assert out.images.shape == (2, 16, 16, 3) and out.images.dtype == np.uint8
    assert out.used_seed == 5 and out.warnings == []
    with Txt2ImgClient(server.http_url, protocol="http") as http:
        again = http.generate(PROMPT, seed=5, steps=4, num_images=2)
    np.testing.assert_array_equal(again.images, out.images)


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_same_seed_same_image_as_in_process(client, served_model, sampler):
    from ldm.pipeline import Txt2ImgPipeline

    kw = dict(negative_prompt="blurry", steps=6, guidance_scale=5.0, seed=21, sampler=sampler)
    out = client.generate(PROMPT, num_images=2, **kw)
    want = Txt2ImgPipeline(served_model)([PROMPT] * 2, **kw)
    assert psnr(out.images, want) >= 40


def test_different_prompts_give_different_images(client):
    # Strong guidance: the tiny random model's prompts must differ clearly.
    a = client.generate(PROMPT, seed=3, steps=4, guidance_scale=5.0).images
    b = client.generate("a blue square in the bottom right", seed=3, steps=4,
                        guidance_scale=5.0).images
    assert psnr(a, b) < 30


def test_stream_over_grpc_in_order(client):
    events = list(client.iter_stream(PROMPT, seed=8, steps=5, num_images=2))
    progress, final = events[:-1], events[-1]
    assert all(isinstance(e, StreamProgress) for e in progress)
    assert [(e.step, e.total) for e in progress] == [(i, 5) for i in range(1, 6)]
    assert all(e.preview.shape == (2, 4, 4, 3) and e.preview.dtype == np.uint8
               for e in progress)
    assert isinstance(final, Txt2ImgOutput)
    np.testing.assert_array_equal(final.images,
                                  client.generate(PROMPT, seed=8, steps=5, num_images=2).images)


def test_stream_over_http_generate_stream(server, client):
    body = {"prompt": PROMPT, "num_inference_steps": 4, "seed": 9, "guidance_scale": 5.0}
    url = f"http://{server.http_url}/v2/models/ldm_txt2img_stream/generate_stream"
    events = []
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[len("data: "):]))
    assert [(e["step"], e["total"]) for e in events[:-1]] == [(i, 4) for i in range(1, 5)]
    assert len(events[-2]["preview"]) == 4 * 4 * 3
    final = events[-1]
    images = np.array(final["images"], dtype=np.uint8).reshape(1, 16, 16, 3)
    np.testing.assert_array_equal(
        images, client.generate(PROMPT, seed=9, steps=4, guidance_scale=5.0).images)
    assert final["used_seed"] == 9 and final["warnings"] == []


def test_cancelled_stream_stops_the_loop(server, client):
    _, before = unet_counts(server)
    seen = []
    t0 = time.monotonic()
    with contextlib.closing(client.iter_stream(PROMPT, seed=1, steps=1000)) as stream:
        for event in stream:
            seen.append(event)
            if len(seen) == 3:
                break  # closing the iterator cancels the gRPC stream
    # The server-side loop stops at its next UNet call: the count settles far below 1000.
    last = settled_unet_calls(server, t0, limit=30, quiet=1.0)
    assert [e.step for e in seen] == [1, 2, 3]
    assert 3 <= last - before < 100
    assert server.is_ready()
    assert client.generate(PROMPT, steps=2).images.shape == (1, 16, 16, 3)


def test_cancelled_plain_request_stops_the_loop(server, client):
    # ldm_txt2img passes requests to ldm_txt2img_stream; a client's cancel must still reach
    # the loop there (Triton 2.51's BLS cannot cancel: a cancel message does).
    from server.client import build_inputs
    from server.contract import GenerationRequest

    _, before = unet_counts(server)
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    outcome = []
    call = raw.async_infer("ldm_txt2img",
                           build_inputs(grpcclient, GenerationRequest(prompt=PROMPT, steps=1000)),
                           callback=lambda result, error: outcome.append(error))
    t0 = time.monotonic()
    while unet_counts(server)[1] - before < 3:
        assert time.monotonic() - t0 < 30, "the request never started"
        time.sleep(0.05)
    call.cancel()
    last = settled_unet_calls(server, t0, limit=60, quiet=1.5)
    assert last - before < 200, last - before
    assert outcome and outcome[0] is not None  # the client got its cancellation
    raw.close()
    assert client.generate(PROMPT, steps=2).images.shape == (1, 16, 16, 3)


def test_concurrent_requests_are_batched_in_unet(server, client):
    exec_before, req_before = unet_counts(server)
    results, errors = [], []

    def stream(seed):
        try:
            results.append(client.stream(PROMPT, seed=seed, steps=8))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def plain(seed):
        try:
            results.append(client.generate(PROMPT, seed=seed, steps=8))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=stream, args=(s,)) for s in range(4)]
    threads += [threading.Thread(target=plain, args=(s,)) for s in range(4, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and len(results) == 6
    executions, requests = unet_counts(server)
    assert requests - req_before == 6 * 8  # one UNet request per step per request
    # Fewer executions than requests: the dynamic batcher merged steps of different requests.
    assert executions - exec_before < requests - req_before


def test_bls_networks_give_the_same_images(repository, served_model, client, tmp_path):
    # networks=bls (how TensorRT engines are served): the pipeline calls the `unet` model
    # through Triton instead of opening its ONNX graph; same loop, same images.
    import shutil

    from server.repository import PipelineOptions, assemble

    repo = tmp_path / "model_repository"
    shutil.copytree(repository, repo)
    assemble(repo, PipelineOptions(serving={"networks": "bls"},
                                   limits={"max_steps": 1000, "default_steps": 4}))
    kw = dict(seed=4, steps=5, num_images=2, guidance_scale=5.0)
    with TritonServer(repo, log_path=tmp_path / "tritonserver.log") as bls_server:
        with Txt2ImgClient(bls_server.grpc_url, timeout=60) as bls_client:
            got = bls_client.generate(PROMPT, **kw).images
        stats = httpx.get(f"http://{bls_server.http_url}/v2/models/unet/stats").json()
    assert int(stats["model_stats"][0]["inference_stats"]["success"]["count"]) == 5
    assert psnr(got, client.generate(PROMPT, **kw).images) >= 40


@pytest.mark.parametrize("precision, min_psnr", [("fp32", 40.0), ("bf16", 20.0)])
def test_openvino_networks_serve_the_same_images(repository, client, tmp_path, precision,
                                                 min_psnr):
    # networks=openvino: the pipeline compiles the same graphs with OpenVINO in process.
    # fp32: the same images; bf16 (8-bit mantissas): close ones, from the bf16 arithmetic.
    import shutil

    from export.openvino import native_bf16
    from server.repository import PipelineOptions, assemble, read_pipeline_config

    if precision == "bf16" and not native_bf16():
        pytest.skip("this CPU has no native bf16")
    repo = tmp_path / "model_repository"
    shutil.copytree(repository, repo)
    assemble(repo, PipelineOptions(
        serving={"networks": "openvino", "precision": precision,
                 "openvino_cache": str(tmp_path / "ov-cache")},
        limits={"max_steps": 1000, "default_steps": 4}))
    assert read_pipeline_config(repo / "ldm_txt2img_stream")[1].networks == "openvino"
    kw = dict(seed=4, steps=5, num_images=2, guidance_scale=5.0)
    with TritonServer(repo, log_path=tmp_path / "tritonserver.log",
                      models=("ldm_txt2img", "ldm_txt2img_stream")) as ov_server:
        with Txt2ImgClient(ov_server.grpc_url, timeout=60) as ov_client:
            got = ov_client.generate(PROMPT, **kw).images
    want = client.generate(PROMPT, **kw).images  # ONNX Runtime fp32
    assert got.shape == want.shape and psnr(got, want) >= min_psnr
    assert any((tmp_path / "ov-cache").iterdir())  # compiled once, imported on a restart


def test_torch_networks_serve_the_same_images_and_merge_steps(served_ldm_dir, served_model,
                                                             tmp_path):
    # networks=torch, built in one command: the pipeline runs the PyTorch modules from the
    # repository's pytorch/ weights (on the GPU where there is one; here the CPU), with the
    # same loop, the same images and the in-process batcher merging concurrent requests.
    from ldm.pipeline import Txt2ImgPipeline
    from server import build
    from server.repository import read_pipeline_config

    repo = tmp_path / "model_repository"
    assert build.main(["--checkpoint", str(served_ldm_dir), "--out", str(repo), "--quiet",
                       "--models", "text_encoder,unet,vae_decoder", "--max-batch", "4",
                       "--work-dir", str(tmp_path / "work"), "--networks", "torch"]) == 0
    options = read_pipeline_config(repo / "ldm_txt2img_stream")[1]
    assert (options.networks, options.precision, options.device) == ("torch", "auto", "auto")
    kw = dict(steps=5, num_images=1, guidance_scale=5.0)
    got: dict[int, np.ndarray] = {}
    with TritonServer(repo, log_path=tmp_path / "tritonserver.log",
                      models=("ldm_txt2img", "ldm_txt2img_stream")) as torch_server:
        with Txt2ImgClient(torch_server.grpc_url, timeout=60) as torch_client:
            threads = [threading.Thread(target=lambda s=s: got.__setitem__(
                s, torch_client.generate(PROMPT, seed=s, **kw).images)) for s in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
        executions, calls = unet_counts(torch_server)
    assert len(got) == 3 and calls > executions  # steps of different requests ran as one
    pipe = Txt2ImgPipeline(served_model)
    for seed, images in got.items():
        want = pipe([PROMPT], negative_prompt="", seed=seed, steps=5, guidance_scale=5.0,
                    sampler="ddim")
        assert psnr(images, want) >= 40


BAD = [
    ({"steps": 0}, "num_inference_steps must be in [1, 1000], got 0"),
    ({"guidance_scale": 100.0}, "guidance_scale must be in [0, 20], got 100"),
    ({"sampler": "euler"}, "unknown sampler 'euler'; allowed: ddim, plms, dpmpp_2m, ddpm"),
    ({"num_images": 9}, "num_images must be in [1, 4], got 9"),
    ({"height": 20}, "height 20 is not supported by this model; allowed: 16"),
    ({"seed": -3}, "seed must be in [0, "),
]


@pytest.mark.parametrize("params, message", BAD, ids=[next(iter(p)) for p, _ in BAD])
def test_bad_inputs_get_clear_errors(client, params, message):
    with pytest.raises(Txt2ImgError) as e:
        client.generate(PROMPT, **params)
    assert message in str(e.value) and e.value.invalid_argument
    with pytest.raises(Txt2ImgError) as e:  # the same over the stream
        client.stream(PROMPT, **params)
    # A stream's error carries Triton's message but no status code.
    assert message in str(e.value)


def test_bad_inputs_over_http_and_missing_prompt(server):
    with Txt2ImgClient(server.http_url, protocol="http") as http, pytest.raises(Txt2ImgError) as e:
        http.generate("x" * 2001)
    assert "prompt has 2001 characters; at most 2000" in str(e.value)
    assert e.value.status == "400"
    raw = grpcclient.InferenceServerClient(server.grpc_url)
    steps = grpcclient.InferInput("num_inference_steps", [1], "INT32")
    steps.set_data_from_numpy(np.array([3], np.int32))
    with pytest.raises(Exception, match="prompt"):
        raw.infer("ldm_txt2img", [steps])
    raw.close()


def test_a_bad_request_does_not_fail_the_others(server, client):
    outcomes: dict[str, object] = {}

    def run(name, **params):
        try:
            outcomes[name] = client.generate(PROMPT, steps=4, **params)
        except Txt2ImgError as e:
            outcomes[name] = e

    threads = [threading.Thread(target=run, args=("good1",), kwargs={"seed": 1}),
               threading.Thread(target=run, args=("bad",), kwargs={"sampler": "nope"}),
               threading.Thread(target=run, args=("good2",), kwargs={"seed": 2})]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert isinstance(outcomes["bad"], Txt2ImgError)
    assert isinstance(outcomes["good1"], Txt2ImgOutput)
    assert isinstance(outcomes["good2"], Txt2ImgOutput)
    assert server.is_ready()
    with httpclient.InferenceServerClient(server.http_url) as http:
        assert http.is_server_live() and http.is_model_ready("ldm_txt2img")


def test_truncation_is_reported(client):
    long = "red circle " * 60  # 120 word pieces > 75
    assert client.generate(long, steps=2).warnings == ["prompt truncated to 77 tokens"]
    out = client.stream(PROMPT, negative_prompt=long, steps=2)
    assert out.warnings == ["negative_prompt truncated to 77 tokens"]


def test_cli_writes_pngs(server, client, tmp_path, capsys):
    from PIL import Image

    rc = main(["a red circle", "-o", str(tmp_path / "x.png"), "--url", server.grpc_url,
               "--steps", "3", "--seed", "4", "--num-images", "2", "--sampler", "plms"])
    assert rc == 0
    want = client.generate("a red circle", steps=3, seed=4, num_images=2, sampler="plms")
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / f"x_{i}.png")),
                                      want.images[i])
    err = capsys.readouterr().err
    assert "seed 4" in err
    # The bar reached its total (4: CompVis's DDIM grid for 3 of 1000 steps has 4 points).
    assert re.search(r"denoising: 100%.* 4/4 ", err)
    assert main(["x", "--url", server.grpc_url, "--steps", "0",
                 "-o", str(tmp_path / "y.png")]) == 1
    assert "num_inference_steps must be in [1, 1000], got 0" in capsys.readouterr().err
    assert not (tmp_path / "y.png").exists()
