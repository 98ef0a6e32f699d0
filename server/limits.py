"""What a text-to-image request may ask for, and the parsing that enforces it.

The limits are the served model's `config.pbtxt` parameters (strings), written by
`server.repository.write_pipeline_models` and editable by hand:

    parameters [ { key: "max_steps" value: { string_value: "100" } }, ... ]

`parse_request` turns one request's input arrays into a `GenerationRequest`, or raises
`InvalidRequest` with a message meant for the client ("num_inference_steps must be in
[1, 100], got 500"). Pure Python + numpy: no Triton, no torch.
"""
from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, fields

import numpy as np

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


class InvalidRequest(ValueError):
    """A request value outside the limits; the message goes back to the client as is."""


@dataclass(frozen=True)
class Limits:
    """Per-request bounds and defaults of one served pipeline model."""

    sizes: tuple[int, ...]  # allowed heights and widths, pixels; the first is the default
    max_steps: int = 100
    min_guidance_scale: float = 0.0
    max_guidance_scale: float = 20.0
    max_images: int = 4
    max_prompt_chars: int = 2000  # the tokenizer keeps 77 tokens anyway: refuse megabytes
    samplers: tuple[str, ...] = KNOWN_SAMPLERS
    default_steps: int = 25
    default_guidance_scale: float = 1.5
    default_sampler: str = "ddim"

    def __post_init__(self) -> None:
        if not self.sizes or any(s <= 0 for s in self.sizes):
            raise ValueError(f"sizes must be positive, got {self.sizes}")
        if self.max_steps < 1 or not 1 <= self.default_steps <= self.max_steps:
            raise ValueError(f"need 1 <= default_steps ({self.default_steps}) <= max_steps "
                             f"({self.max_steps})")
        lo, hi = self.min_guidance_scale, self.max_guidance_scale
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"bad guidance range [{lo}, {hi}]")
        if not lo <= self.default_guidance_scale <= hi:
            raise ValueError(f"default_guidance_scale {self.default_guidance_scale} outside "
                             f"[{lo}, {hi}]")
        if self.max_images < 1 or self.max_prompt_chars < 1:
            raise ValueError("max_images and max_prompt_chars must be >= 1")
        unknown = [s for s in self.samplers if s not in KNOWN_SAMPLERS]
        if unknown or not self.samplers:
            raise ValueError(f"unknown sampler(s) {unknown}; allowed: {list(KNOWN_SAMPLERS)}")
        if self.default_sampler not in self.samplers:
            raise ValueError(f"default_sampler {self.default_sampler!r} not in {self.samplers}")

    @property
    def default_size(self) -> int:
        return self.sizes[0]

    def to_parameters(self) -> dict[str, str]:
        """config.pbtxt `parameters` (all strings; tuples comma-separated)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = ",".join(map(str, v)) if isinstance(v, tuple) else str(v)
        return out

    @classmethod
    def from_parameters(cls, params: Mapping[str, str]) -> Limits:
        """Inverse of `to_parameters`; keys that are not limits are ignored."""
        kwargs = {}
        for f in fields(cls):
            if f.name not in params:
                continue
            raw = str(params[f.name]).strip()
            try:
                kwargs[f.name] = _convert(f.name, raw, cls.__dataclass_fields__[f.name].type)
            except ValueError as e:
                raise ValueError(f"parameter {f.name}={raw!r}: {e}") from None
        if "sizes" not in kwargs:
            raise ValueError("parameter sizes (allowed image sizes) is required")
        return cls(**kwargs)


def _convert(name: str, raw: str, annotation: str):
    if annotation == "tuple[int, ...]":
        return tuple(int(x) for x in raw.split(",") if x.strip())
    if annotation == "tuple[str, ...]":
        return tuple(x.strip() for x in raw.split(",") if x.strip())
    if annotation == "int":
        return int(raw)
    if annotation == "float":
        return float(raw)
    return raw


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request: a prompt and N images of it."""

    prompt: str
    negative_prompt: str = ""
    steps: int = 25
    guidance_scale: float = 5.0
    seed: int = 0
    sampler: str = "ddim"
    num_images: int = 1
    height: int = 0
    width: int = 0


Inputs = Mapping[str, np.ndarray | None]


def _scalar(inputs: Inputs, name: str) -> np.generic | bytes | None:
    """The single element of input `name`, or None when the request leaves it out."""
    a = inputs.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.size != 1:
        raise InvalidRequest(f"{name} must hold exactly one value, got shape {list(a.shape)}")
    return a.reshape(-1)[0]


def _text(inputs: Inputs, name: str, limits: Limits, default: str | None) -> str:
    v = _scalar(inputs, name)
    if v is None:
        if default is None:
            raise InvalidRequest(f"input {name!r} is required")
        return default
    if isinstance(v, np.str_ | str):
        text = str(v)
    elif isinstance(v, bytes | np.bytes_):
        try:
            text = bytes(v).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequest(f"{name} is not valid UTF-8") from None
    else:
        raise InvalidRequest(f"{name} must be a string (BYTES), got {type(v).__name__}")
    if len(text) > limits.max_prompt_chars:
        raise InvalidRequest(f"{name} has {len(text)} characters; at most "
                             f"{limits.max_prompt_chars} are accepted")
    return text


def _integer(inputs: Inputs, name: str, default: int, lo: int, hi: int) -> int:
    v = _scalar(inputs, name)
    if v is None:
        return default
    if not isinstance(v, np.integer | int):
        raise InvalidRequest(f"{name} must be an integer, got {type(v).__name__}")
    value = int(v)
    if not lo <= value <= hi:
        raise InvalidRequest(f"{name} must be in [{lo}, {hi}], got {value}")
    return value


def _size(inputs: Inputs, name: str, limits: Limits) -> int:
    v = _scalar(inputs, name)
    if v is None:
        return limits.default_size
    if not isinstance(v, np.integer | int) or int(v) not in limits.sizes:
        allowed = ", ".join(map(str, limits.sizes))
        raise InvalidRequest(f"{name} {v} is not supported by this model; allowed: {allowed}")
    return int(v)


def parse_request(inputs: Inputs, limits: Limits) -> GenerationRequest:
    """Validate one request's input arrays (name -> array, None when absent) against `limits`."""
    unknown = sorted(set(inputs) - set(INPUTS))
    if unknown:
        raise InvalidRequest(f"unknown input(s) {unknown}; expected {list(INPUTS)}")
    prompt = _text(inputs, "prompt", limits, default=None)
    negative = _text(inputs, "negative_prompt", limits, default="")
    steps = _integer(inputs, "num_inference_steps", limits.default_steps, 1, limits.max_steps)

    g = _scalar(inputs, "guidance_scale")
    if g is None:
        guidance = limits.default_guidance_scale
    else:
        if not isinstance(g, np.floating | np.integer | float | int):
            raise InvalidRequest(f"guidance_scale must be a number, got {type(g).__name__}")
        guidance = float(g)
        lo, hi = limits.min_guidance_scale, limits.max_guidance_scale
        if not (math.isfinite(guidance) and lo <= guidance <= hi):
            raise InvalidRequest(f"guidance_scale must be in [{lo:g}, {hi:g}], got {guidance:g}")

    seed = _integer(inputs, "seed", -1, 0, MAX_SEED)
    if seed < 0:  # not given: a fresh one, returned to the client so it can reproduce
        seed = secrets.randbelow(2**31)

    sampler = _text(inputs, "sampler", limits, default=limits.default_sampler).strip().lower()
    if sampler not in limits.samplers:
        raise InvalidRequest(f"unknown sampler {sampler!r}; allowed: {', '.join(limits.samplers)}")
    num_images = _integer(inputs, "num_images", 1, 1, limits.max_images)
    return GenerationRequest(
        prompt=prompt, negative_prompt=negative, steps=steps, guidance_scale=guidance,
        seed=seed, sampler=sampler, num_images=num_images,
        height=_size(inputs, "height", limits), width=_size(inputs, "width", limits),
    )
