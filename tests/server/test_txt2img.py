"""The served loop with in-process PyTorch networks plugged in, against ldm.pipeline."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from ldm.pipeline import Txt2ImgPipeline
from server.batching import CallBatcher
from server.contract import GenerationRequest, PipelineInfo, ServingOptions
from server.networks import host_function
from server.txt2img import (
    Cancelled,
    EmbeddingCache,
    Progress,
    Txt2ImgService,
    latent_preview,
)
from tests.server.conftest import make_prompt_sensitive_ldm, psnr


@pytest.fixture(scope="module")
def model():
    return make_prompt_sensitive_ldm()


class Recorder:
    """The three networks of `model` as numpy functions, recording what they are called with."""

    def __init__(self, model):
        self.model = model
        self.encoded: list[np.ndarray] = []
        self.unet_batches: list[int] = []
        self.decoded = 0

    @torch.no_grad()
    def encode(self, ids: np.ndarray) -> np.ndarray:
        assert ids.dtype == np.int64 and ids.shape[1:] == (77,)
        self.encoded.append(ids)
        return self.model.cond_stage_model.embed_tokens(torch.from_numpy(ids)).numpy()

    @torch.no_grad()
    def unet(self, x: np.ndarray, t: np.ndarray, c: np.ndarray) -> np.ndarray:
        assert x.dtype == np.float32 and t.dtype == np.int64 and c.dtype == np.float32
        assert t.shape == (x.shape[0],) and c.shape[0] == x.shape[0]
        self.unet_batches.append(x.shape[0])
        return self.model.apply_model(torch.from_numpy(x), torch.from_numpy(t),
                                      torch.from_numpy(c)).numpy()

    @torch.no_grad()
    def decode(self, z: np.ndarray) -> np.ndarray:
        self.decoded += 1
        return self.model.decode_first_stage(torch.from_numpy(z)).numpy()


def make_service(model, options: ServingOptions | None = None,
                 batcher: CallBatcher | None = None) -> tuple[Txt2ImgService, Recorder]:
    rec = Recorder(model)
    options = options or ServingOptions()
    info = PipelineInfo(latent_channels=4, downsample_factor=4, parameterization="eps",
                        max_seq_len=77, scale_factor=0.5)
    encode, unet, decode = (host_function(f) for f in (rec.encode, rec.unet, rec.decode))
    service = Txt2ImgService(info, model.alphas_cumprod.numpy(), model.cond_stage_model.tknz_fn,
                             encode, unet, decode, options, batcher)
    return service, rec


def request(**kw) -> GenerationRequest:
    base = dict(prompt="a red circle in the top left", negative_prompt="blurry", steps=5,
                guidance_scale=5.0, seed=11, sampler="ddim", num_images=2, height=16, width=16)
    return GenerationRequest(**{**base, **kw})


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpmpp_2m", "ddpm"])
def test_same_seed_same_images_as_in_process_pipeline(model, sampler):
    service, _ = make_service(model)
    req = request(sampler=sampler)
    got = service.generate(req)
    want = Txt2ImgPipeline(model)([req.prompt] * 2, negative_prompt=req.negative_prompt,
                                  steps=req.steps, guidance_scale=req.guidance_scale,
                                  seed=req.seed, sampler=sampler)
    assert got.images.dtype == np.uint8 and got.images.shape == (2, 16, 16, 3)
    assert psnr(got.images, want) >= 50
    assert got.seed == 11 and got.warnings == []


def test_prompt_negative_prompt_and_seed_change_the_images(model):
    service, _ = make_service(model)
    base = service.generate(request()).images
    assert psnr(base, service.generate(request(prompt="a blue square")).images) < 35
    assert psnr(base, service.generate(request(negative_prompt="")).images) < 45
    assert psnr(base, service.generate(request(seed=12)).images) < 20


def test_one_batched_unet_call_per_step_with_guidance(model):
    service, rec = make_service(model)
    service.generate(request(num_images=3, steps=4, sampler="ddim"))
    assert rec.unet_batches == [6] * 4  # [uncond x 3, cond x 3] once per step
    assert rec.decoded == 1


def test_concurrent_requests_share_unet_calls_and_keep_their_images(model):
    # Four requests with their own seeds, samplers and step counts, in four threads: with a
    # batcher their UNet calls merge (batches above one request's 2 x 2), and every request
    # still gets the images it gets alone.
    reqs = [request(seed=s, sampler=sampler, steps=steps) for s, sampler, steps in
            [(1, "ddim", 5), (2, "plms", 5), (3, "ddpm", 4), (4, "dpmpp_2m", 6)]]
    alone, rec_alone = make_service(model)
    want = [alone.generate(r).images for r in reqs]
    batched, rec = make_service(model, batcher=CallBatcher(max_wait_s=5.0))
    got: dict[int, np.ndarray] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(
        i, batched.generate(reqs[i]).images)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(got) == [0, 1, 2, 3]
    for i in range(4):
        assert psnr(got[i], want[i]) >= 50
    assert max(rec.unet_batches) > 4
    assert sum(rec.unet_batches) == sum(rec_alone.unet_batches)  # every item ran, once


def test_guidance_scale_one_skips_the_unconditional_half(model):
    service, rec = make_service(model)
    service.generate(request(num_images=3, steps=4, guidance_scale=1.0))
    assert rec.unet_batches == [3] * 4
    assert len(rec.encoded) == 1  # the negative prompt is not even encoded


def test_embeddings_are_cached_by_text(model):
    service, rec = make_service(model)
    service.generate(request(prompt="one", steps=1))
    service.generate(request(prompt="two", steps=1))
    # "one", "blurry", "two": the shared negative prompt was encoded once.
    assert len(rec.encoded) == 3
    assert service.cache.hits == 1


def test_embedding_cache_evicts_least_recently_used():
    cache = EmbeddingCache(size=2)
    computed = []

    def compute(text):
        computed.append(text)
        return torch.zeros(1, 2, 3), False

    for text in ["a", "b", "a", "c", "a", "b"]:
        cache.get(text, compute)
    # "b" was evicted by "c" (least recently used), then recomputed.
    assert computed == ["a", "b", "c", "b"]
    assert len(cache) == 2


def test_progress_every_step_in_order_with_previews(model):
    service, _ = make_service(model, ServingOptions(preview="latent", preview_every=2))
    events: list[Progress] = []
    out = service.generate(request(steps=5), on_progress=events.append)
    assert [(e.step, e.total) for e in events] == [(i, 5) for i in range(1, 6)]
    with_preview = [e.step for e in events if e.preview is not None]
    assert with_preview == [2, 4, 5]  # every 2nd step, and the last
    assert events[-1].preview.shape == (2, 4, 4, 3) and events[-1].preview.dtype == np.uint8
    assert out.steps_run == 5


def test_decoded_preview_is_full_size(model):
    service, rec = make_service(model, ServingOptions(preview="decoded", preview_every=5))
    events: list[Progress] = []
    service.generate(request(steps=5, num_images=1), on_progress=events.append)
    assert events[-1].preview.shape == (1, 16, 16, 3)
    assert rec.decoded == 2  # one preview + the final decode


def test_cancel_stops_before_the_next_unet_call(model):
    service, rec = make_service(model)
    events = []
    with pytest.raises(Cancelled):
        service.generate(request(steps=50), on_progress=events.append,
                         is_cancelled=lambda: len(events) >= 3)
    assert len(rec.unet_batches) == 3
    assert rec.decoded == 0


def test_truncation_is_reported(model):
    service, _ = make_service(model)
    long = "word " * 100
    out = service.generate(request(prompt=long, steps=1))
    assert out.warnings == ["prompt truncated to 77 tokens"]
    out = service.generate(request(negative_prompt=long, steps=1))
    assert out.warnings == ["negative_prompt truncated to 77 tokens"]
    # Without guidance the negative prompt is unused: nothing to report.
    assert service.generate(request(negative_prompt=long, steps=1,
                                    guidance_scale=1.0)).warnings == []


def test_size_must_be_a_multiple_of_the_vae_factor(model):
    service, _ = make_service(model)
    with pytest.raises(ValueError, match="multiples of 4"):
        service.generate(request(height=18))


def test_latent_preview_closed_form():
    x0 = torch.zeros(2, 4, 3, 5)
    x0[:, 0] = 2.0  # R: top of the +-2 range
    x0[:, 1] = -2.0  # G: bottom
    x0[:, 2] = 1.0  # B: (0.5 + 1) * 127.5 = 191.25
    x0[:, 3] = 100.0  # channel 4 is not shown
    out = latent_preview(x0)
    assert out.shape == (2, 3, 5, 3) and out.dtype == np.uint8
    assert (out[..., 0] == 255).all() and (out[..., 1] == 0).all() and (out[..., 2] == 191).all()
    grey = latent_preview(torch.full((1, 1, 2, 2), 0.5))  # one channel -> grey
    assert (grey == 159).all()  # round((0.25 + 1) * 127.5) = 159


def test_unresolved_requests_are_refused(model):
    service, rec = make_service(model)
    with pytest.raises(ValueError, match=r"fields \['seed'\] unset: resolve it"):
        service.generate(request(seed=None))
    assert rec.unet_batches == []
