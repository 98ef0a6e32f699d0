"""networks: torch: the PyTorch modules under the served loop, and the weights they load."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from export.manifest import TORCH_WEIGHTS
from export.repository import write_torch_weights
from ldm.pipeline import Txt2ImgPipeline
from server.batching import CallBatcher
from server.contract import GenerationRequest, ServingOptions
from server.torch_networks import (
    model_service,
    network_dtypes,
    resolve_device,
    torch_networks,
)
from server.txt2img import Txt2ImgService
from tests.conftest import make_tiny_ldm
from tests.server.conftest import make_prompt_sensitive_ldm, psnr


@pytest.fixture(scope="module")
def model():
    return make_prompt_sensitive_ldm()


def service_of(precision="fp32", batcher=None) -> Txt2ImgService:
    return model_service(make_prompt_sensitive_ldm(), torch.device("cpu"), precision,
                         batcher=batcher)


def request(seed=11, **kw) -> GenerationRequest:
    base = dict(prompt="a red circle in the top left", negative_prompt="blurry", steps=5,
                guidance_scale=5.0, seed=seed, sampler="ddim", num_images=2, height=16,
                width=16)
    return GenerationRequest(**{**base, **kw})


def in_process(model, req: GenerationRequest) -> np.ndarray:
    return Txt2ImgPipeline(model)([req.prompt] * req.num_images,
                                  negative_prompt=req.negative_prompt, steps=req.steps,
                                  guidance_scale=req.guidance_scale, seed=req.seed,
                                  sampler=req.sampler, height=req.height, width=req.width)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_fp32_modules_give_the_in_process_images(model, sampler):
    req = request(sampler=sampler)
    got = service_of().generate(req)
    assert not got.warnings
    np.testing.assert_array_equal(got.images, in_process(model, req))


def test_bf16_modules_give_close_images_and_keep_the_vae_fp32(model):
    req = request()
    service = service_of("bf16")
    got = service.generate(req).images
    want = in_process(model, req)
    assert 20 <= psnr(got, want) < float("inf")  # bf16 arithmetic: close, not equal
    # The networks' outputs come back as fp32 whatever they ran in.
    ids = torch.zeros((1, 77), dtype=torch.int64)
    assert service.encode_fn(ids).dtype == torch.float32


def test_concurrent_requests_merge_their_steps_and_keep_their_images(model):
    batcher = CallBatcher(max_wait_s=0.5)
    service = service_of(batcher=batcher)
    reqs = [request(seed=s, num_images=1) for s in range(3)]
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda r=r: got.__setitem__(r.seed,
                                                                   service.generate(r).images))
               for r in reqs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    unet = batcher.stats["unet"]
    assert unet.calls > unet.executions  # steps of different requests ran as one batch
    for r in reqs:  # a merged batch may round a pixel differently (kernels per batch size)
        assert psnr(got[r.seed], in_process(model, r)) >= 45


def test_network_precisions():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert set(network_dtypes("auto", cpu).values()) == {torch.float32}
    assert network_dtypes("auto", gpu) == {"text_encoder": torch.float16,
                                           "unet": torch.float16,
                                           "vae_decoder": torch.float32}
    assert network_dtypes("bf16", cpu)["unet"] == torch.bfloat16
    assert network_dtypes("fp16", gpu)["vae_decoder"] == torch.float32


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    if torch.cuda.is_available():
        assert resolve_device("auto", 1) == torch.device("cuda", 1)
        return
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="device cuda:1: this machine has no CUDA GPU"):
        resolve_device("cuda:1")


def test_options_refuse_precisions_a_runtime_does_not_run():
    with pytest.raises(ValueError, match="precision fp16 is not one networks=openvino runs"):
        ServingOptions(networks="openvino", precision="fp16")
    with pytest.raises(ValueError, match="precision bf16 is not one networks=onnxruntime"):
        ServingOptions(networks="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="device"):
        ServingOptions(networks="torch", device="gpu0")
    assert ServingOptions(networks="torch", precision="fp16", device="cuda:1").device == "cuda:1"


def test_written_weights_are_the_ema_ones_and_load_strictly(tmp_path):
    from export.steps import use_ema_weights

    model = make_tiny_ldm()
    with torch.no_grad():  # EMA weights unlike the training ones
        for buf in model.model_ema.buffers():
            if buf.is_floating_point():
                buf.add_(0.5)
    ema = {n: getattr(model.model_ema, model.model_ema.m_name2s_name[n]).clone()
           for n, _ in model.model.named_parameters()}
    assert use_ema_weights(model, True) == "ema"
    write_torch_weights(model, tmp_path / TORCH_WEIGHTS)

    from safetensors import safe_open

    with safe_open(tmp_path / TORCH_WEIGHTS / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert not [k for k in keys if k.startswith("model_ema.")]
        for name, value in ema.items():
            torch.testing.assert_close(f.get_tensor(f"model.{name}"), value, rtol=0, atol=0)
    fns = torch_networks(tmp_path, "fp32", torch.device("cpu"))  # strict load
    assert sorted(fns) == ["text_encoder", "unet", "vae_decoder"]


def test_a_repository_without_weights_says_how_to_get_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="--torch-weights"):
        torch_networks(tmp_path, "fp32", torch.device("cpu"))


def test_non_finite_decoded_values_are_reported():
    service = model_service(make_prompt_sensitive_ldm(), torch.device("cpu"))
    decode = service.decode_fn

    def overflowing_decoder(z: torch.Tensor) -> torch.Tensor:
        image = decode(z)
        image[:, :, 0, 0] = float("nan")  # what an fp16 GroupNorm overflow leaves behind
        return image

    service.decode_fn = overflowing_decoder
    result = service.generate(request())  # 2 images x 3 channels x one pixel
    assert any("6 non-finite values" in w for w in result.warnings), result.warnings
