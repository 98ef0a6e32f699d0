"""The served text-to-image loop, with the three networks behind torch functions on one device.

The Triton pipeline models (`ldm_txt2img`, `ldm_txt2img_stream`) plug the `text_encoder`,
`unet` and `vae_decoder` networks into `Txt2ImgService` as functions of torch tensors on the
service's `device` (server/networks.py makes them): the PyTorch modules themselves
(`networks: torch`, on a GPU or the CPU), ONNX Runtime or OpenVINO on the repository's ONNX
files inside the pipeline's own process (host functions: no IPC per step), or BLS calls to
those Triton models (`networks: bls`, TensorRT engines; GPU tensors go through DLPack). On
a GPU the latents, the context and abar_t stay on the device for the whole loop: only the
prompt's token ids go in and the uint8 images come out. Concurrent requests run in threads;
with in-process networks a `server.batching.CallBatcher` merges their network calls, as
Triton's dynamic batcher merges BLS calls. Everything else happens here and matches
`ldm.pipeline.Txt2ImgPipeline` step for step, so a seed gives the same image in process and
through Triton:

1. tokenize (BERT or CLIP, 77 tokens; truncation is reported) and encode the prompt, and the
   negative prompt when guidance is on (both cached by text: the empty negative prompt is
   computed once);
2. x_T = `ldm.pipeline.initial_noise(seed, (N, C, h, w))` and sampler noise from a CPU
   generator seeded with seed + 1, moved to the device: a seed gives the same image on
   every device;
3. run the sampler over `cfg_denoiser(unet_fn, ...)`: one UNet call per step on the batch
   [uncond x N, cond x N];
4. decode and convert to (N, H, W, 3) uint8.

Progress goes to `on_progress(Progress)` after every step; `is_cancelled()` is polled before
every UNet call and stops the loop with `Cancelled`.
"""
from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ldm.pipeline import initial_noise, latents_to_uint8
from ldm.samplers import get_sampler
from ldm.samplers.guidance import cfg_denoiser
from server.batching import CallBatcher
from server.contract import GenerationRequest, PipelineInfo, ServingOptions

log = logging.getLogger(__name__)

# The networks, as functions of tensors on the service's device (shapes as in export/specs.py):
EncodeFn = Callable[[torch.Tensor], torch.Tensor]  # input_ids (B, L) int64 -> context (B, L, D)
# latent (B, C, h, w) f32, timestep (B,) int64, context (B, L, D) f32 -> noise_pred (B, C, h, w)
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
DecodeFn = Callable[[torch.Tensor], torch.Tensor]  # latent (B, C, h, w) -> image (B, 3, H, W)

class Cancelled(Exception):
    """The client went away; the loop stopped early."""


@dataclass
class Progress:
    step: int  # 1-based: steps done
    total: int  # steps the sampler takes (DDIM may take one more than asked)
    preview: np.ndarray | None = None  # (N, h, w, 3) uint8


@dataclass
class Result:
    images: np.ndarray  # (N, H, W, 3) uint8
    seed: int
    warnings: list[str] = field(default_factory=list)
    steps_run: int = 0


def latent_preview(x0: torch.Tensor) -> np.ndarray:
    """Predicted clean latents (N, C, h, w) -> a rough (N, h, w, 3) uint8 picture, no VAE call.

    The first three latent channels as RGB (one channel repeated when C < 3). The latents are
    already scaled to about unit variance (scale_factor), so +-2 spans nearly all of them; a
    fixed range keeps colours stable from step to step.
    """
    x = x0[:, :3] if x0.shape[1] >= 3 else x0[:, :1].expand(-1, 3, -1, -1)
    return latents_to_uint8(x / 2)


class EmbeddingCache:
    """Thread-safe LRU map text -> (context (1, L, D), truncated) of at most `size` entries."""

    def __init__(self, size: int = 64):
        self.size = size
        self._data: OrderedDict[str, tuple[torch.Tensor, bool]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, text: str,
            compute: Callable[[str], tuple[torch.Tensor, bool]]) -> tuple[torch.Tensor, bool]:
        with self._lock:
            if text in self._data:
                self._data.move_to_end(text)
                self.hits += 1
                return self._data[text]
        value = compute(text)  # outside the lock: a BLS call may take a while
        with self._lock:
            self.misses += 1
            self._data[text] = value
            self._data.move_to_end(text)
            while len(self._data) > self.size:
                self._data.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._data)


def _cap(graph_max: int, option: int) -> int:
    return min(graph_max, option) if option > 0 else graph_max


class Txt2ImgService:
    """Generates images for validated requests with pluggable networks (see module docstring).

    `tokenizer` is BERT's or CLIP's (`ldm.modules.conditioning.open_tokenizer`; anything with
    `tokenize(texts) -> (ids (B, L), truncated flags)`). Safe to call from several threads.
    """

    def __init__(self, info: PipelineInfo, alphas_cumprod: np.ndarray, tokenizer,
                 encode_fn: EncodeFn, unet_fn: UNetFn, decode_fn: DecodeFn,
                 options: ServingOptions | None = None,
                 batcher: CallBatcher | None = None, device: str | torch.device = "cpu"):
        options = options or ServingOptions()
        self.info = info
        self.device = torch.device(device)
        self.alphas_cumprod = torch.from_numpy(np.asarray(alphas_cumprod)).to(self.device)
        self.tokenizer = tokenizer
        # With a batcher, the calls of concurrent generate() threads are merged (each network
        # up to the batch its graph takes); without one, each call runs as made.
        self.batcher = batcher
        if batcher is not None:
            encode_fn = batcher.wrap(encode_fn, info.text_encoder.max_batch, "text_encoder")
            unet_fn = batcher.wrap(unet_fn, _cap(info.unet.max_batch, options.unet_max_batch),
                                   "unet")
            decode_fn = batcher.wrap(decode_fn, _cap(info.vae_decoder.max_batch,
                                                     options.vae_max_batch), "vae_decoder")
        self.encode_fn, self.unet_fn, self.decode_fn = encode_fn, unet_fn, decode_fn
        self.options = options
        self.cache = EmbeddingCache(options.embedding_cache)
        # HF fast tokenizers raise "Already borrowed" when two threads change their
        # truncation settings at once.
        self._tokenizer_lock = threading.Lock()

    def _embed_uncached(self, text: str) -> tuple[torch.Tensor, bool]:
        with self._tokenizer_lock:
            ids, truncated = self.tokenizer.tokenize([text])
        context = self.encode_fn(ids.to(self.device, torch.int64))
        return context.float(), bool(truncated[0])

    def embed(self, text: str) -> tuple[torch.Tensor, bool]:
        """(context (1, L, D), truncated) of `text`, from the cache when seen recently."""
        return self.cache.get(text, self._embed_uncached)

    def _torch_unet(self, is_cancelled: Callable[[], bool] | None, counter: list[int]):
        def unet(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            if is_cancelled is not None and is_cancelled():
                raise Cancelled("request cancelled")
            counter[0] += 1
            return self.unet_fn(x, t.to(torch.int64), c).float()
        return unet

    def generate(self, req: GenerationRequest,
                 on_progress: Callable[[Progress], object] | None = None,
                 is_cancelled: Callable[[], bool] | None = None) -> Result:
        """(N, H, W, 3) uint8 images for `req`; raises Cancelled when `is_cancelled()` says so."""
        if self.batcher is None:
            return self._generate(req, on_progress, is_cancelled)
        with self.batcher.member():
            return self._generate(req, on_progress, is_cancelled)

    def _generate(self, req: GenerationRequest,
                  on_progress: Callable[[Progress], object] | None,
                  is_cancelled: Callable[[], bool] | None) -> Result:
        info, f = self.info, self.info.downsample_factor
        unset = [k for k, v in req.model_dump().items() if v is None]
        if unset:
            raise ValueError(f"request fields {unset} unset: resolve it against the limits first")
        if req.height % f or req.width % f:
            raise ValueError(f"height and width must be multiples of {f}")
        warnings = []
        cond, cut = self.embed(req.prompt)
        if cut:
            warnings.append(f"prompt truncated to {info.max_seq_len} tokens")
        uncond = None
        if req.guidance_scale != 1.0:  # as the in-process pipeline: s = 1 needs no uncond
            uncond, cut = self.embed(req.negative_prompt)
            if cut:
                warnings.append(f"negative_prompt truncated to {info.max_seq_len} tokens")

        shape = (req.num_images, info.latent_channels, req.height // f, req.width // f)
        x_T = initial_noise(req.seed, shape).to(self.device)
        unet_calls = [0]
        eps_fn = cfg_denoiser(self._torch_unet(is_cancelled, unet_calls), cond, uncond,
                              req.guidance_scale, info.parameterization, self.alphas_cumprod)
        steps_run = [0]

        def callback(i: int, total: int, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
            steps_run[0] = i + 1
            if on_progress is None:
                return
            preview = None
            every = self.options.preview_every
            if self.options.preview != "none" and ((i + 1) % every == 0 or i + 1 == total):
                preview = self.preview(pred_x0)
            on_progress(Progress(i + 1, total, preview))

        generator = torch.Generator().manual_seed(req.seed + 1)
        with torch.no_grad():
            z = get_sampler(req.sampler)(eps_fn, x_T, self.alphas_cumprod, req.steps,
                                         generator=generator, callback=callback)
            if is_cancelled is not None and is_cancelled():
                raise Cancelled("request cancelled")
            images = self.decode_fn(z)
        log.debug("request done: %d steps, %d UNet calls", steps_run[0], unet_calls[0])
        bad = int((~torch.isfinite(images)).sum())
        if bad:  # a reduced-precision overflow: NaN turns black in uint8, so say it
            log.warning("%d non-finite values in the decoded images", bad)
            warnings.append(f"{bad} non-finite values in the decoded images (numeric overflow "
                            "in the networks); the image is not trustworthy")
        return Result(latents_to_uint8(images), req.seed, warnings, steps_run[0])

    def preview(self, pred_x0: torch.Tensor) -> np.ndarray:
        if self.options.preview == "decoded":
            return latents_to_uint8(self.decode_fn(pred_x0))
        return latent_preview(pred_x0)
