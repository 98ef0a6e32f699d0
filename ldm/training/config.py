"""Typed training configs: `python -m ldm.train {autoencoder,ldm} --config FILE [key=value ...]`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ldm.config import AutoencoderConfig, LDMConfig, LossConfig


@dataclass
class DataConfig:
    name: Literal["shapes", "imagefolder"] = "shapes"
    size: int = 32
    root: str | None = None  # imagefolder: folder holding metadata.jsonl
    length: int = 1_000_000  # shapes: items per epoch
    seed: int = 0
    # Validation items, 0 = no validation. shapes: fresh items (seed + 1); imagefolder: a random
    # subset (drawn with `seed`) of min(val_length, len // 10) images, held out of training, so
    # a folder of < 10 images has no validation; or every image of `val_root` if given.
    val_length: int = 256
    val_root: str | None = None  # imagefolder: a separate validation folder (metadata.jsonl)
    # imagefolder: colour transparent pixels are composited over (a name, #rrggbb or r,g,b).
    background: str = "white"
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["constant", "cosine"] = "constant"
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0  # max global grad norm; 0 disables


@dataclass
class LoopConfig:
    out_dir: str = "runs/default"
    max_steps: int = 1000
    batch_size: int = 32  # global batch, split across processes
    grad_accum: int = 1
    precision: Literal["fp32", "bf16"] = "fp32"
    seed: int = 0
    log_every: int = 10
    val_every: int = 250
    sample_every: int = 500
    ckpt_every: int = 100
    max_minutes: float = 0.0  # stop (and save) after this wall time; 0 = no limit
    # Stop (and save) after this many steps in this invocation, e.g. to train in time slices;
    # the LR schedule still spans max_steps. 0 = no limit.
    stop_after_steps: int = 0
    threads: int = 0  # torch intra-op threads; 0 = torch's default


@dataclass
class AutoencoderTrainConfig:
    model: AutoencoderConfig = field(
        default_factory=lambda: AutoencoderConfig(lossconfig=LossConfig())
    )
    # Train the decoder only (encoder and quant_conv frozen): the latent space stays fixed, so an
    # LDM trained on this autoencoder stays valid while its decoder improves.
    freeze_encoder: bool = False
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class LDMTrainConfig:
    model: LDMConfig = field(default_factory=LDMConfig)
    # Our autoencoder checkpoint (folder) whose weights and ddconfig become the frozen first stage.
    first_stage: str | None = None
    ema_decay: float = 0.9999
    sample_steps: int = 25
    sample_guidance: float = 3.0
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: LoopConfig = field(default_factory=LoopConfig)
