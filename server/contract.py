"""What the gateway, the client, the bench and the Triton models agree on; no torch, no Triton.

- names: the pipeline models, the files of their version folders, the request's Triton
  inputs and the response's outputs (the same tensor names everywhere);
- `Limits` and `ServingOptions`: a pipeline model's `config.pbtxt` parameters (strings, as
  Triton keeps them), parsed and checked by pydantic;
- `PipelineInfo`: the exported networks' facts the loop needs (`pipeline.json`; defined in
  server/pipeline_info.py);
- `GenerationRequest`: one text-to-image request, the one typed model that the gateway and
  the client build, that travels as Triton inputs (`to_inputs` / `from_inputs`) and that the
  edge that receives it checks against the served model's limits (`resolve`).
"""
from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from server.pipeline_info import PIPELINE_FILE, NetworkTarget, PipelineInfo

# --- names ---------------------------------------------------------------------------------

# A served model's name N (the id the API's `model` field picks) makes its Triton models:
# `N_txt2img` (one response), `N_txt2img_stream` (decoupled: progress, then the images) and
# its networks `N_text_encoder`, `N_unet`, `N_vae_decoder`. The default name keeps the plain
# network names it always had (`text_encoder`, ...).
DEFAULT_NAME = "ldm"
NAME_PATTERN = r"[a-z0-9][a-z0-9-]*"
FRONT_SUFFIX, STREAM_SUFFIX = "_txt2img", "_txt2img_stream"
PIPELINE_MODELS: tuple[str, ...] = ("ldm_txt2img", "ldm_txt2img_stream")  # the default's


def pipeline_names(name: str = DEFAULT_NAME) -> tuple[str, str]:
    """(front, streaming) Triton model names of the served model `name`."""
    return f"{name}{FRONT_SUFFIX}", f"{name}{STREAM_SUFFIX}"


def network_prefix(name: str = DEFAULT_NAME) -> str:
    """What goes before the served model's network names ("" for the default)."""
    return "" if name == DEFAULT_NAME else f"{name}_"


def is_streaming(model: str) -> bool:
    return model.endswith(STREAM_SUFFIX)


def served_name(model: str) -> str | None:
    """The served model's name of a pipeline model's Triton name (None for other models)."""
    for suffix in (STREAM_SUFFIX, FRONT_SUFFIX):
        if model.endswith(suffix) and re.fullmatch(NAME_PATTERN, model[:-len(suffix)]):
            return model[:-len(suffix)]
    return None
NETWORKS: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")  # what the loop calls
ALPHAS_FILE = "alphas_cumprod.npy"
TOKENIZER_DIR = "tokenizer"

# Samplers the pipeline knows (ldm.samplers.SAMPLERS); kept here so parsing needs no torch.
KNOWN_SAMPLERS: tuple[str, ...] = ("ddim", "plms", "dpmpp_2m", "ddpm")
# seed + 1 seeds the sampler's generator, and both travel as int64.
MAX_SEED = 2**63 - 2

# Request inputs: name -> (Triton data type, what it means).
INPUTS: dict[str, tuple[str, str]] = {
    "prompt": ("TYPE_STRING", "the text to draw (UTF-8)"),
    "negative_prompt": ("TYPE_STRING", "what to steer away from; default empty"),
    "num_inference_steps": ("TYPE_INT32", "sampler steps"),
    "guidance_scale": ("TYPE_FP32", "classifier-free guidance scale s; 1 disables guidance"),
    "seed": ("TYPE_INT64", "x_T and sampler noise seed; default random"),
    "sampler": ("TYPE_STRING", "ddim, plms, dpmpp_2m or ddpm"),
    "num_images": ("TYPE_INT32", "images for this prompt"),
    "height": ("TYPE_INT32", "image height in pixels"),
    "width": ("TYPE_INT32", "image width in pixels"),
}
REQUIRED_INPUTS: tuple[str, ...] = ("prompt",)
# Response outputs: name -> (Triton data type, dims). The streaming model adds the progress.
OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "images": ("TYPE_UINT8", [-1, -1, -1, 3]),  # (N, H, W, 3)
    "warnings": ("TYPE_STRING", [-1]),
    "used_seed": ("TYPE_INT64", [1]),
}
PROGRESS_OUTPUTS: dict[str, tuple[str, list[int]]] = {
    "step": ("TYPE_INT32", [1]),
    "total": ("TYPE_INT32", [1]),
    "preview": ("TYPE_UINT8", [-1, -1, -1, 3]),  # (N, h, w, 3)
}
STREAM_OUTPUTS: tuple[str, ...] = (*PROGRESS_OUTPUTS, *OUTPUTS)

# Parameters the Python backend itself reads; allowed beside ours.
BACKEND_PARAMETERS: tuple[str, ...] = ("EXECUTION_ENV_PATH", "FORCE_CPU_ONLY_INPUT_TENSORS")


class InvalidRequest(ValueError):
    """A request value outside the limits; the message goes back to the client as is."""


# --- config.pbtxt parameters ---------------------------------------------------------------

def _split(value: Any) -> Any:
    """"256,128" (a config.pbtxt string) -> ["256", "128"]; other values as they are."""
    if isinstance(value, str):
        return [x.strip() for x in value.split(",") if x.strip()]
    return value


Sizes = Annotated[tuple[int, ...], BeforeValidator(_split)]
Names = Annotated[tuple[str, ...], BeforeValidator(_split)]


class Parameters(BaseModel):
    """A model whose fields are config.pbtxt parameters (strings there, typed here)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    def to_parameters(self) -> dict[str, str]:
        """config.pbtxt `parameters`: all strings, tuples comma-separated."""
        return {k: ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
                for k, v in self.model_dump().items()}

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]):
        """Inverse of `to_parameters`; keys that belong to other models are ignored."""
        values = {k: str(v).strip() for k, v in params.items() if k in cls.model_fields}
        try:
            return cls.model_validate(values)
        except ValidationError as e:
            raise ValueError(parameter_error(e, values)) from None


def parameter_error(error: ValidationError, values: Mapping[str, Any]) -> str:
    """pydantic's first error as one line naming the parameter and its value."""
    first = error.errors()[0]
    name = str(first["loc"][0]) if first["loc"] else ""
    if name in values:
        return f"parameter {name}={values[name]!r}: {first['msg']}"
    return f"parameter {name}: {first['msg']}" if name else first["msg"]


class Limits(Parameters):
    """Per-request bounds and defaults of one served pipeline model."""

    sizes: Sizes = Field(min_length=1)  # allowed heights and widths, pixels; the first is
    # the default
    max_steps: int = Field(100, ge=1)
    min_guidance_scale: float = Field(0.0, allow_inf_nan=False)
    max_guidance_scale: float = Field(20.0, allow_inf_nan=False)
    max_images: int = Field(4, ge=1)
    max_prompt_chars: int = Field(2000, ge=1)  # the tokenizer keeps 77 tokens: refuse megabytes
    samplers: Names = Field(KNOWN_SAMPLERS, min_length=1)
    # DDIM 10: the fastest (sampler, steps) within 1 point of the best judged accuracy on
    # the demo model, 0.46x the time of DDIM 25 (bench/RESULTS.md, python -m bench.steps)
    default_steps: int = 10
    default_guidance_scale: float = 1.5
    default_sampler: str = "ddim"

    @model_validator(mode="after")
    def _consistent(self) -> Limits:
        if any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes must be positive, got {self.sizes}")
        if not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"need 1 <= default_steps ({self.default_steps}) <= max_steps "
                             f"({self.max_steps})")
        lo, hi = self.min_guidance_scale, self.max_guidance_scale
        if lo > hi:
            raise ValueError(f"bad guidance range [{lo}, {hi}]")
        if not lo <= self.default_guidance_scale <= hi:
            raise ValueError(f"default_guidance_scale {self.default_guidance_scale} outside "
                             f"[{lo}, {hi}]")
        unknown = [s for s in self.samplers if s not in KNOWN_SAMPLERS]
        if unknown:
            raise ValueError(f"unknown sampler(s) {unknown}; allowed: {list(KNOWN_SAMPLERS)}")
        if self.default_sampler not in self.samplers:
            raise ValueError(f"default_sampler {self.default_sampler!r} not in {self.samplers}")
        return self

    @property
    def default_size(self) -> int:
        return self.sizes[0]


PREVIEW_MODES: tuple[str, ...] = ("none", "latent", "decoded")
NETWORK_MODES: tuple[str, ...] = ("onnxruntime", "openvino", "torch", "bls")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "auto")
PRECISIONS_OF: dict[str, tuple[str, ...]] = {"openvino": ("fp32", "bf16", "auto"),
                                              "torch": PRECISIONS}


class ServingOptions(Parameters):
    """config.pbtxt parameters of a pipeline model that are not request limits."""

    # none | latent (cheap, h x w) | decoded (a VAE call, H x W)
    preview: Literal["none", "latent", "decoded"] = "latent"
    preview_every: int = Field(1, ge=1)  # steps between previews (streaming model)
    embedding_cache: int = Field(64, ge=1)  # prompts whose embeddings are kept
    torch_threads: int = Field(1, ge=1)  # the loop's own math is tiny: cores go to the UNet
    # Requests a pipeline model runs at once (more wait their turn); their guided UNet steps
    # share one batch, so 8 fills the exported UNet's batch of 16.
    max_concurrent: int = Field(8, ge=1)
    # onnxruntime / openvino: the pipeline runs the repository's ONNX graphs itself (no IPC
    # per step) on that runtime; torch: the PyTorch modules (`pytorch/` weights) on `device`;
    # bls: it calls the text_encoder/unet/vae_decoder models (TensorRT, or another host).
    # Older repositories lack the parameter: written for BLS.
    networks: Literal["onnxruntime", "openvino", "torch", "bls"] = "bls"
    # Arithmetic of the text encoder and UNet in process: fp32; bf16 (OpenVINO on CPUs with
    # native bf16, or torch); fp16 (torch); auto: OpenVINO bf16 where native, torch fp16 on
    # a GPU, else fp32. ONNX Runtime runs fp32 only; the VAE decoder always runs fp32.
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    # Where the loop's tensors live (and torch networks run): cpu, cuda, cuda:N, or auto
    # (the Triton instance's GPU, else cuda when there is one, else cpu).
    device: str = Field("cpu", pattern=r"^(cpu|auto|cuda(:\d+)?)$")
    openvino_cache: str = ""  # compiled-model cache folder; "": the repository's own
    intra_op_threads: int = Field(0, ge=0)  # ONNX Runtime threads in process; 0: all cores
    batch_wait_ms: int = Field(10, ge=0)  # longest a network call waits for other requests'
    # Most items one UNet / VAE decoder run takes (0: what the graph takes). A run's
    # activations grow with its batch; for networks that fill the cores at batch 1-2 (the
    # paper's 1.45 B model: the same time per item at batch 2, 4 and 8) a cap costs no
    # throughput and bounds memory. server/repository.py sets them for large models.
    unet_max_batch: int = Field(0, ge=0)
    vae_max_batch: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _precision_of_networks(self) -> ServingOptions:
        allowed = PRECISIONS_OF.get(self.networks, ("fp32",))
        if self.precision not in allowed:
            raise ValueError(f"precision {self.precision} is not one networks={self.networks} "
                             f"runs (it runs {', '.join(allowed)})")
        return self


def config_parameters(model_config: Mapping[str, Any]) -> dict[str, str]:
    """Parameters of a JSON model config (an empty value comes without `string_value`)."""
    return {k: v.get("string_value", "") for k, v in model_config.get("parameters", {}).items()}


def check_parameters(params: Mapping[str, str]) -> None:
    """Refuse config.pbtxt parameters that neither the limits nor the options know."""
    known = set(Limits.model_fields) | set(ServingOptions.model_fields)
    unknown = sorted(set(params) - known - set(BACKEND_PARAMETERS))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown}; allowed: {sorted(known)}")


# --- the request ---------------------------------------------------------------------------

class GenerationRequest(BaseModel):
    """One request: a prompt and N images of it. None: the served model's default.

    Field names are Python's; the aliases are the Triton input names (`steps` travels as
    `num_inference_steps`). Strict types: 2.0 is not a step count, "2" not a number.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, populate_by_name=True)

    prompt: str
    negative_prompt: str | None = None
    steps: int | None = Field(None, alias="num_inference_steps")
    guidance_scale: float | None = None
    seed: int | None = None
    sampler: str | None = None
    num_images: int | None = None
    height: int | None = None
    width: int | None = None

    def to_inputs(self) -> dict[str, np.ndarray]:
        """The Triton inputs (name -> (1,) array) of the fields that are set."""
        out = {}
        for name, value in self.model_dump(by_alias=True, exclude_none=True).items():
            dtype = INPUTS[name][0]
            out[name] = (np.array([value.encode("utf-8")], dtype=np.object_)
                         if dtype == "TYPE_STRING" else np.array([value], _NUMPY[dtype]))
        return out

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, np.ndarray | None]) -> GenerationRequest:
        """The request in one request's Triton input arrays (None: left out)."""
        unknown = sorted(set(inputs) - set(INPUTS))
        if unknown:
            raise InvalidRequest(f"unknown input(s) {unknown}; expected {list(INPUTS)}")
        values = {}
        for name, (dtype, _) in INPUTS.items():
            v = _scalar(inputs, name)
            if v is not None:
                values[name] = _READERS[dtype](name, v)
        if "prompt" not in values:
            raise InvalidRequest("input 'prompt' is required")
        return cls.model_validate(values)

    def resolve(self, limits: Limits) -> GenerationRequest:
        """Every field set: defaults filled in, values checked against `limits`."""
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name) or ""
            if len(text) > limits.max_prompt_chars:
                raise InvalidRequest(f"{name} has {len(text)} characters; at most "
                                     f"{limits.max_prompt_chars} are accepted")
        sampler = (self.sampler or limits.default_sampler).strip().lower()
        if sampler not in limits.samplers:
            raise InvalidRequest(f"unknown sampler {sampler!r}; allowed: "
                                 f"{', '.join(limits.samplers)}")
        seed = _within("seed", self.seed, None, 0, MAX_SEED)
        return self.model_copy(update={
            "negative_prompt": self.negative_prompt or "",
            "steps": _within("num_inference_steps", self.steps, limits.default_steps, 1,
                             limits.max_steps),
            "guidance_scale": _guidance(self.guidance_scale, limits),
            # not given: a fresh one, returned to the client so it can reproduce
            "seed": secrets.randbelow(2**31) if seed is None else seed,
            "sampler": sampler,
            "num_images": _within("num_images", self.num_images, 1, 1, limits.max_images),
            "height": _size("height", self.height, limits),
            "width": _size("width", self.width, limits),
        })


def parse_request(inputs: Mapping[str, np.ndarray | None], limits: Limits) -> GenerationRequest:
    """One request's Triton inputs, checked against `limits`, every field set."""
    return GenerationRequest.from_inputs(inputs).resolve(limits)


_NUMPY = {"TYPE_INT32": np.int32, "TYPE_INT64": np.int64, "TYPE_FP32": np.float32}


def _scalar(inputs: Mapping[str, np.ndarray | None], name: str) -> Any:
    """The single element of input `name`, or None when the request leaves it out."""
    a = inputs.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.size != 1:
        raise InvalidRequest(f"{name} must hold exactly one value, got shape {list(a.shape)}")
    return a.reshape(-1)[0]


def _read_text(name: str, v: Any) -> str:
    if isinstance(v, np.str_ | str):
        return str(v)
    if isinstance(v, bytes | np.bytes_):
        try:
            return bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"{name} is not valid UTF-8") from None
    raise InvalidRequest(f"{name} must be a string (BYTES), got {type(v).__name__}")


def _read_int(name: str, v: Any) -> int:
    if not isinstance(v, np.integer | int) or isinstance(v, bool):
        raise InvalidRequest(f"{name} must be an integer, got {type(v).__name__}")
    return int(v)


def _read_float(name: str, v: Any) -> float:
    if not isinstance(v, np.floating | np.integer | float | int) or isinstance(v, bool):
        raise InvalidRequest(f"{name} must be a number, got {type(v).__name__}")
    return float(v)


_READERS = {"TYPE_STRING": _read_text, "TYPE_INT32": _read_int, "TYPE_INT64": _read_int,
            "TYPE_FP32": _read_float}


def _within(name: str, value: int | None, default: int | None, lo: int, hi: int) -> int | None:
    if value is None:
        return default
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _guidance(value: float | None, limits: Limits) -> float:
    if value is None:
        return limits.default_guidance_scale
    lo, hi = limits.min_guidance_scale, limits.max_guidance_scale
    if not (math.isfinite(value) and lo <= value <= hi):
        raise InvalidRequest(f"guidance_scale must be in [{lo:g}, {hi:g}], got {value:g}")
    return value


def _size(name: str, value: int | None, limits: Limits) -> int:
    if value is None:
        return limits.default_size
    if value not in limits.sizes:
        allowed = ", ".join(map(str, limits.sizes))
        raise InvalidRequest(f"{name} {value} is not supported by this model; allowed: {allowed}")
    return value


__all__ = ["ALPHAS_FILE", "BACKEND_PARAMETERS", "DEFAULT_NAME", "FRONT_SUFFIX", "INPUTS",
           "KNOWN_SAMPLERS", "MAX_SEED", "NAME_PATTERN", "NETWORKS", "NETWORK_MODES", "OUTPUTS",
           "PIPELINE_FILE", "PIPELINE_MODELS", "PRECISIONS", "PREVIEW_MODES", "PROGRESS_OUTPUTS",
           "REQUIRED_INPUTS", "STREAM_OUTPUTS", "STREAM_SUFFIX", "TOKENIZER_DIR",
           "GenerationRequest", "InvalidRequest", "Limits", "NetworkTarget", "PipelineInfo",
           "ServingOptions", "check_parameters", "config_parameters", "is_streaming",
           "network_prefix", "parse_request", "pipeline_names", "served_name"]
