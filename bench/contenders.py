"""The timed callables: one text-to-image request each, and one UNet call each.

Every end-to-end contender has the same signature, `generate(prompt, seed) -> (1, H, W, 3)
uint8`, and does the same work: tokenize and encode the prompt (and the empty negative
prompt), `steps` DDIM steps with classifier-free guidance as ONE UNet call on the batch
[uncond, cond], decode, convert to uint8.

1. `EagerPipeline`: `ldm.pipeline.Txt2ImgPipeline`, PyTorch fp32 in this process;
2. `DiffusersLoop`: diffusers' `UNet2DConditionModel`, `AutoencoderKL`, `LDMBertModel` and
   `DDIMScheduler`, the loop of diffusers' `LDMTextToImagePipeline` (CFG batch doubling,
   `scheduler.step`), written out here because that pipeline hard-codes 8x VAE downsampling;
3. `LocalService`: `server.txt2img.Txt2ImgService` (the loop the Triton pipeline model runs)
   on the repository's ONNX files, with ONNX Runtime sessions or OpenVINO at fp32 / bf16 (as
   the served pipeline opens them);
4. `TritonHttp`: `server.client.Txt2ImgClient` over HTTP to `ldm_txt2img`.

The step contenders call the UNet alone on the CFG batch (2 latents, 2 contexts).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

NEGATIVE_PROMPT = ""
Generate = Callable[[str, int], np.ndarray]


class EagerPipeline:
    def __init__(self, model, steps: int, guidance_scale: float):
        from ldm.pipeline import Txt2ImgPipeline

        self.pipe = Txt2ImgPipeline(model)
        self.steps, self.guidance_scale = steps, guidance_scale

    def __call__(self, prompt: str, seed: int) -> np.ndarray:
        # EMA weights were copied in once (bench.models.load_source): no per-call swap.
        return self.pipe([prompt], negative_prompt=NEGATIVE_PROMPT, steps=self.steps,
                         guidance_scale=self.guidance_scale, seed=seed, sampler="ddim",
                         use_ema=False)


class DiffusersLoop:
    """diffusers' LDMTextToImagePipeline loop on the twin (bench.models.DiffusersTwin)."""

    def __init__(self, twin, tokenizer, latent_shape: tuple[int, int, int], steps: int,
                 guidance_scale: float):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # LDMBertModel's deprecation notice, once per run
        self.twin, self.tokenizer = twin, tokenizer  # a transformers BertTokenizerFast
        self.latent_shape = latent_shape  # (C, h, w)
        self.steps, self.guidance_scale = steps, guidance_scale

    def _embed(self, texts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.twin.max_seq_len,
                             truncation=True, return_tensors="pt").input_ids
        return self.twin.text_encoder(ids)[0]

    @torch.no_grad()
    def __call__(self, prompt: str, seed: int) -> np.ndarray:
        tw, g = self.twin, self.guidance_scale
        uncond = self._embed([NEGATIVE_PROMPT])
        cond = self._embed([prompt])
        generator = torch.Generator().manual_seed(seed)
        latents = torch.randn((1, *self.latent_shape), generator=generator)
        tw.scheduler.set_timesteps(self.steps)
        context = torch.cat([uncond, cond])
        for t in tw.scheduler.timesteps:
            noise = tw.unet(torch.cat([latents] * 2), t, encoder_hidden_states=context).sample
            noise_uncond, noise_text = noise.chunk(2)
            noise = noise_uncond + g * (noise_text - noise_uncond)
            latents = tw.scheduler.step(noise, t, latents, eta=0.0).prev_sample
        image = tw.vae.decode(latents / tw.scale_factor).sample
        image = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).numpy()


class LocalService:
    """Txt2ImgService over the repository's graphs in this process: on ONNX Runtime sessions,
    or compiled by OpenVINO at `precision` (what the served pipeline opens with `networks:
    onnxruntime` / `networks: openvino`)."""

    def __init__(self, repository: Path, threads: int, steps: int, guidance_scale: float,
                 image_size: int, networks: str = "onnxruntime", precision: str = "fp32"):
        from server.contract import ServingOptions
        from server.networks import local_service

        self.service = local_service(repository, ServingOptions(
            networks=networks, precision=precision, preview="none"), threads)
        self.unet_step = self.service.unet_fn  # (x, t, c) tensors -> noise_pred: the step
        self.steps, self.guidance_scale, self.image_size = steps, guidance_scale, image_size

    def __call__(self, prompt: str, seed: int) -> np.ndarray:
        from server.contract import GenerationRequest

        req = GenerationRequest(prompt=prompt, negative_prompt=NEGATIVE_PROMPT,
                                steps=self.steps, guidance_scale=self.guidance_scale, seed=seed,
                                sampler="ddim", num_images=1, height=self.image_size,
                                width=self.image_size)
        return self.service.generate(req).images


class TritonHttp:
    """One HTTP client of the `ldm_txt2img` model."""

    def __init__(self, url: str, steps: int, guidance_scale: float, timeout: float):
        from server.client import Txt2ImgClient

        self.client = Txt2ImgClient(url, protocol="http", timeout=timeout)
        self.steps, self.guidance_scale = steps, guidance_scale

    def __call__(self, prompt: str, seed: int) -> np.ndarray:
        return self.client.generate(prompt, negative_prompt=NEGATIVE_PROMPT, steps=self.steps,
                                    guidance_scale=self.guidance_scale, seed=seed,
                                    sampler="ddim", num_images=1).images

    def close(self) -> None:
        self.client.close()


# --- one UNet call on the CFG batch ---------------------------------------------------------

def step_inputs(cfg, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latent (2, C, h, w), timestep (2,), context (2, L, D)): one guided step of one image."""
    g = torch.Generator().manual_seed(seed)
    u = cfg.unet
    x = torch.randn(2, u.in_channels, u.image_size, u.image_size, generator=g)
    t = torch.full((2,), 501, dtype=torch.int64)
    c = torch.randn(2, cfg.cond_stage.max_seq_len, cfg.cond_stage.n_embed, generator=g)
    return x, t, c


def step_functions(model, twin, local: dict[str, object],
                   cfg) -> dict[str, Callable[[], object]]:
    """name -> a no-argument call of that runtime's UNet on the same inputs (`local`: the
    LocalService contenders by name; the others are ignored)."""
    x, t, c = step_inputs(cfg)
    unet = model.model.diffusion_model

    @torch.no_grad()
    def ours():
        return unet(x, t, context=c)

    @torch.no_grad()
    def diffusers():
        return twin.unet(x, t, encoder_hidden_states=c).sample

    steps = {"pytorch_eager": ours, "diffusers": diffusers}
    for name, service in local.items():
        if isinstance(service, LocalService):
            steps[name] = lambda s=service: s.unet_step(x, t, c)
    return steps
