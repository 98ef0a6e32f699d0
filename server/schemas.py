"""Request and response bodies of the HTTP gateway, shaped like OpenAI's images API.

`POST /v1/images/generations` takes OpenAI's fields (`prompt`, `n`, `size` "WxH",
`response_format`), plus ours (`negative_prompt`, `steps`, `guidance_scale`, `seed`,
`sampler`). Fields left out get the served model's defaults, decided by Triton. Pydantic checks
types (strictly: `"2"` or `true` is not a number) and obvious bounds here; the model's own
limits (allowed sizes, max steps, max images, samplers) are checked by the Triton model, whose
message comes back with status 400.
"""
from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from server.contract import MAX_SEED, GenerationRequest

# ASCII only: `\d` alone would take "٢٥٦x٢٥٦" (Arabic-Indic digits), which int() reads as 256.
_SIZE = re.compile(r"\s*([0-9]{1,5})\s*[xX]\s*([0-9]{1,5})\s*", re.ASCII)
# Triton's input names -> the request field a message about them refers to.
INPUT_FIELDS: dict[str, str] = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "num_inference_steps": "steps",
    "guidance_scale": "guidance_scale", "seed": "seed", "sampler": "sampler",
    "num_images": "n", "height": "size", "width": "size",
}


def parse_size(size: str) -> tuple[int, int]:
    """"WIDTHxHEIGHT" -> (width, height) in pixels; ValueError with a message otherwise."""
    m = _SIZE.fullmatch(size)
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"size must be 'WIDTHxHEIGHT' in pixels, e.g. '256x256'; got {size!r}")
    return int(m.group(1)), int(m.group(2))


class ImageGenerationRequest(BaseModel):
    """Body of `POST /v1/images/generations`."""

    # strict: JSON types as declared, no "2" -> 2 or true -> 1. The example's size is the one
    # the demo model (checkpoints/demo/ldm: latent 8 x f=4) serves.
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [{
        "prompt": "a red circle in the top left", "n": 2, "size": "32x32",
        "steps": 25, "guidance_scale": 5.0, "seed": 1, "sampler": "ddim"}]})

    prompt: str = Field(min_length=1, description="the text to draw")
    n: int = Field(1, ge=1, le=10, description="images to generate (the model may allow fewer)")
    size: str | None = Field(None, description="'WIDTHxHEIGHT' in pixels; default: the size "
                             "the model was trained at")
    response_format: Literal["b64_json", "url"] = Field(
        "b64_json", description="only 'b64_json' (base64 PNG) is supported")
    model: str | None = Field(None, description="which served model draws (GET /v1/models); "
                              "default: the server's first")
    user: str | None = Field(None, description="accepted for OpenAI clients; ignored")
    negative_prompt: str | None = Field(None, description="what to steer away from")
    steps: int | None = Field(None, ge=1, le=2**31 - 1, description="sampler steps")
    guidance_scale: float | None = Field(None, ge=0, allow_inf_nan=False,
                                         description="classifier-free guidance scale; 1: off")
    seed: int | None = Field(None, ge=0, le=MAX_SEED,
                             description="same seed, same parameters: same images")
    sampler: str | None = Field(None, description="ddim, plms, dpmpp_2m or ddpm (as the model "
                                "allows)")

    @field_validator("size")
    @classmethod
    def _check_size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v

    def to_request(self) -> GenerationRequest:
        """The request this body asks for (None: the model's default)."""
        width, height = parse_size(self.size) if self.size else (None, None)
        return GenerationRequest(
            prompt=self.prompt, negative_prompt=self.negative_prompt, steps=self.steps,
            guidance_scale=self.guidance_scale, seed=self.seed, sampler=self.sampler,
            num_images=self.n, height=height, width=width)


class StreamRequest(ImageGenerationRequest):
    """Body of `POST /v1/images/generations/stream`."""

    preview: bool = Field(True, description="send low-resolution previews with the progress "
                          "events")


class ImageData(BaseModel):
    b64_json: str = Field(description="a PNG image, base64-encoded")
    revised_prompt: str | None = None


class ImageGenerationResponse(BaseModel):
    created: int = Field(description="Unix time of the response")
    data: list[ImageData]
    seed: int = Field(description="the seed used: send it back to reproduce the images")
    size: str = Field(description="'WIDTHxHEIGHT' of the images")
    warnings: list[str] = Field(default_factory=list,
                                description="e.g. 'prompt truncated to 77 tokens'")


class ProgressEvent(BaseModel):
    """`event: progress` of the stream."""

    step: int = Field(description="sampler steps done")
    total: int = Field(description="sampler steps in all")
    previews: list[str] = Field(default_factory=list, description="base64 PNGs, one per image")


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class Health(BaseModel):
    status: str
    detail: str | None = None
