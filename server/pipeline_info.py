"""pipeline.json: what the served loop needs to know of the exported networks.

Written by server/repository.py into each pipeline model's version folder, read by the
pipeline model (server/bls.py) and by checks outside Triton (server/networks.py). Part of the
torch-free contract (server/contract.py re-exports it).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

PIPELINE_FILE = "pipeline.json"


class NetworkTarget(BaseModel):
    """One network the loop calls, as export/specs.py exported it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: str  # its Triton model name
    inputs: list[str]  # tensor names, in call order
    output: str
    # Inputs a batched model declares as `dims: [1] reshape: { shape: [] }`
    # (export/triton_config.py): sent through BLS as (B, 1), not (B,).
    unsqueeze: list[str] = []
    onnx: str | None = None  # the graph's path from the repository root (None: engines only)
    max_batch: int = Field(16, ge=1)  # the largest batch the graph takes


class PipelineInfo(BaseModel):
    """Facts about the exported model that the loop needs (pipeline.json in the model folder)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    latent_channels: int
    downsample_factor: int  # image pixels per latent pixel (the VAE's f)
    parameterization: Literal["eps", "x0"]  # what the UNet predicts
    max_seq_len: int  # tokens per prompt
    scale_factor: float  # informational: the VAE graphs apply it themselves
    text_encoder: NetworkTarget = NetworkTarget(model="text_encoder", inputs=["input_ids"],
                                                output="context")
    unet: NetworkTarget = NetworkTarget(model="unet", inputs=["latent", "timestep", "context"],
                                        output="noise_pred", unsqueeze=["timestep"])
    vae_decoder: NetworkTarget = NetworkTarget(model="vae_decoder", inputs=["latent"],
                                               output="image")

    def target(self, network: str) -> NetworkTarget:
        return getattr(self, network)

    def save(self, folder: Path) -> None:
        (Path(folder) / PIPELINE_FILE).write_text(self.model_dump_json(indent=1) + "\n")

    @classmethod
    def load(cls, folder: Path) -> PipelineInfo:
        return cls.model_validate(json.loads((Path(folder) / PIPELINE_FILE).read_text()))
