"""The served text-to-image loop, with the three networks behind plain numpy functions.

The Triton pipeline models (`ldm_txt2img`, `ldm_txt2img_stream`) plug the `text_encoder`,
`unet` and `vae_decoder` networks into `Txt2ImgService`: either ONNX Runtime sessions on the
repository's ONNX files inside the pipeline's own process (`networks: onnxruntime`, the CPU
default: no IPC per step), or BLS calls to those Triton models (`networks: bls`, for TensorRT
engines); tests plug in the PyTorch modules. Concurrent requests run in threads; with
in-process networks a `server.batching.CallBatcher` merges their network calls, as Triton's
dynamic batcher merges BLS calls. Everything else happens here and matches
`ldm.pipeline.Txt2ImgPipeline` step for step, so a seed gives the same image in process and
through Triton:

1. tokenize (BERT, 77 tokens; truncation is reported) and encode the prompt, and the negative
   prompt when guidance is on (both cached by text: the empty negative prompt is computed once);
2. x_T = `ldm.pipeline.initial_noise(seed, (N, C, h, w))`, sampler noise from a generator
   seeded with seed + 1;
3. run the sampler over `cfg_denoiser(unet_fn, ...)`: one UNet call per step on the batch
   [uncond x N, cond x N];
4. decode and convert to (N, H, W, 3) uint8.

Progress goes to `on_progress(Progress)` after every step; `is_cancelled()` is polled before
every UNet call and stops the loop with `Cancelled`.
"""
from __future__ import annotations

import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ldm.pipeline import initial_noise, latents_to_uint8
from ldm.samplers import get_sampler
from ldm.samplers.guidance import cfg_denoiser
from server.batching import CallBatcher
from server.limits import GenerationRequest, Limits

log = logging.getLogger(__name__)

PIPELINE_FILE = "pipeline.json"
ALPHAS_FILE = "alphas_cumprod.npy"
TOKENIZER_DIR = "tokenizer"

# The networks, as numpy functions (shapes as in export/specs.py):
EncodeFn = Callable[[np.ndarray], np.ndarray]  # input_ids (B, L) int64 -> context (B, L, D) f32
# latent (B, C, h, w) f32, timestep (B,) int64, context (B, L, D) f32 -> noise_pred (B, C, h, w)
UNetNumpyFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
DecodeFn = Callable[[np.ndarray], np.ndarray]  # latent (B, C, h, w) -> image (B, 3, H, W) [-1, 1]

PREVIEW_MODES: tuple[str, ...] = ("none", "latent", "decoded")
NETWORKS: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")
NETWORK_MODES: tuple[str, ...] = ("onnxruntime", "bls")


class Cancelled(Exception):
    """The client went away; the loop stopped early."""


def _target(model: str, inputs: list[str], output: str, unsqueeze: list[str] | None = None):
    return {"model": model, "inputs": inputs, "output": output, "unsqueeze": unsqueeze or [],
            "onnx": None, "max_batch": 16}


@dataclass(frozen=True)
class PipelineInfo:
    """Facts about the exported model that the loop needs (pipeline.json in the model folder)."""

    latent_channels: int
    downsample_factor: int  # image pixels per latent pixel (the VAE's f)
    parameterization: str  # "eps" or "x0": what the UNet predicts
    max_seq_len: int  # tokens per prompt
    scale_factor: float  # informational: the VAE graphs apply it themselves
    # The networks, from export/specs.py: {"model", "inputs" (names in call order), "output",
    # "unsqueeze", "onnx", "max_batch"}. "unsqueeze" lists the inputs that a batched model
    # declares as `dims: [1] reshape: { shape: [] }` (export/triton_config.py): sent through
    # BLS as (B, 1), not (B,). "onnx" is the graph's path relative to the repository root
    # (None when the repository holds no ONNX file, e.g. TensorRT engines); "max_batch" the
    # largest batch the graph takes.
    text_encoder: dict = field(default_factory=lambda: _target(
        "text_encoder", ["input_ids"], "context"))
    unet: dict = field(default_factory=lambda: _target(
        "unet", ["latent", "timestep", "context"], "noise_pred", ["timestep"]))
    vae_decoder: dict = field(default_factory=lambda: _target(
        "vae_decoder", ["latent"], "image"))

    def save(self, folder: Path) -> None:
        (folder / PIPELINE_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> PipelineInfo:
        return cls(**json.loads((folder / PIPELINE_FILE).read_text()))


@dataclass(frozen=True)
class ServingOptions:
    """config.pbtxt parameters of a pipeline model that are not request limits."""

    preview: str = "latent"  # none | latent (cheap, h x w) | decoded (a VAE call, H x W)
    preview_every: int = 1  # steps between previews (streaming model)
    embedding_cache: int = 64  # prompts whose embeddings are kept
    torch_threads: int = 1  # the loop's own math is tiny; leave the cores to the UNet
    # Requests a pipeline model runs at once, a thread each (more wait their turn); their
    # guided UNet steps share one batch, so 8 fills the exported UNet's batch of 16.
    max_concurrent: int = 8
    # onnxruntime: the pipeline runs the repository's ONNX graphs itself (no IPC per step);
    # bls: it calls the text_encoder/unet/vae_decoder models (TensorRT, or another host).
    # Older repositories lack the parameter: they were written for BLS.
    networks: str = "bls"
    intra_op_threads: int = 0  # ONNX Runtime threads of in-process networks; 0: all cores
    batch_wait_ms: int = 10  # longest a network call waits for other requests' calls
    # Most items one UNet / VAE decoder run takes (0: what the graph takes). A run's
    # activations grow with its batch; for networks that fill the cores at batch 1-2 (the
    # paper's 1.45 B model: the same time per item at batch 2, 4 and 8) a cap costs no
    # throughput and bounds memory. server/repository.py sets them for large models.
    unet_max_batch: int = 0
    vae_max_batch: int = 0

    def __post_init__(self) -> None:
        if self.preview not in PREVIEW_MODES:
            raise ValueError(f"preview {self.preview!r}; allowed: {list(PREVIEW_MODES)}")
        if self.networks not in NETWORK_MODES:
            raise ValueError(f"networks {self.networks!r}; allowed: {list(NETWORK_MODES)}")
        if min(self.preview_every, self.embedding_cache, self.torch_threads,
               self.max_concurrent) < 1:
            raise ValueError("preview_every, embedding_cache, torch_threads and "
                             "max_concurrent must be >= 1")
        if min(self.intra_op_threads, self.batch_wait_ms, self.unet_max_batch,
               self.vae_max_batch) < 0:
            raise ValueError("intra_op_threads, batch_wait_ms, unet_max_batch and "
                             "vae_max_batch must be >= 0")

    def to_parameters(self) -> dict[str, str]:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_parameters(cls, params: dict[str, str]) -> ServingOptions:
        kwargs = {}
        for name, f in cls.__dataclass_fields__.items():
            if name in params:
                raw = str(params[name]).strip()
                try:
                    kwargs[name] = int(raw) if f.type == "int" else raw
                except ValueError:
                    raise ValueError(f"parameter {name}={raw!r}: not an integer") from None
        return cls(**kwargs)


# Parameters the Python backend itself reads; allowed beside ours.
BACKEND_PARAMETERS: tuple[str, ...] = ("EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS")


def check_parameters(params: dict[str, str]) -> None:
    """Refuse config.pbtxt parameters that neither the limits nor the options know."""
    known = set(Limits.__dataclass_fields__) | set(ServingOptions.__dataclass_fields__)
    unknown = sorted(set(params) - known - set(BACKEND_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; allowed: {sorted(known)}")


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

    `tokenizer` is an `ldm.modules.text_encoder.BERTTokenizer` (anything with
    `tokenize(texts) -> (ids (B, L), truncated flags)`). Safe to call from several threads.
    """

    def __init__(self, info: PipelineInfo, alphas_cumprod: np.ndarray, tokenizer,
                 encode_fn: EncodeFn, unet_fn: UNetNumpyFn, decode_fn: DecodeFn,
                 options: ServingOptions = ServingOptions(),
                 batcher: CallBatcher | None = None):
        self.info = info
        self.alphas_cumprod = torch.from_numpy(np.asarray(alphas_cumprod))
        self.tokenizer = tokenizer
        # With a batcher, the calls of concurrent generate() threads are merged (each network
        # up to the batch its graph takes); without one, each call runs as made.
        self.batcher = batcher
        if batcher is not None:
            encode_fn = batcher.wrap(encode_fn, info.text_encoder["max_batch"], "text_encoder")
            unet_fn = batcher.wrap(unet_fn, _cap(info.unet["max_batch"], options.unet_max_batch),
                                   "unet")
            decode_fn = batcher.wrap(decode_fn, _cap(info.vae_decoder["max_batch"],
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
        context = self.encode_fn(np.ascontiguousarray(ids.numpy().astype(np.int64)))
        return torch.from_numpy(np.array(context, dtype=np.float32)), bool(truncated[0])

    def embed(self, text: str) -> tuple[torch.Tensor, bool]:
        """(context (1, L, D), truncated) of `text`, from the cache when seen recently."""
        return self.cache.get(text, self._embed_uncached)

    def _torch_unet(self, is_cancelled: Callable[[], bool] | None, counter: list[int]):
        def unet(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            if is_cancelled is not None and is_cancelled():
                raise Cancelled("request cancelled")
            counter[0] += 1
            out = self.unet_fn(np.ascontiguousarray(x.numpy(), dtype=np.float32),
                               np.ascontiguousarray(t.numpy(), dtype=np.int64),
                               np.ascontiguousarray(c.numpy(), dtype=np.float32))
            return torch.from_numpy(np.asarray(out, dtype=np.float32))
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
        x_T = initial_noise(req.seed, shape)
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
            images = self.decode_fn(np.ascontiguousarray(z.numpy(), dtype=np.float32))
        log.debug("request done: %d steps, %d UNet calls", steps_run[0], unet_calls[0])
        return Result(latents_to_uint8(torch.from_numpy(np.asarray(images))), req.seed,
                      warnings, steps_run[0])

    def preview(self, pred_x0: torch.Tensor) -> np.ndarray:
        if self.options.preview == "decoded":
            image = self.decode_fn(np.ascontiguousarray(pred_x0.numpy(), dtype=np.float32))
            return latents_to_uint8(torch.from_numpy(np.asarray(image)))
        return latent_preview(pred_x0)
