"""Train or fine-tune: `python -m ldm.train {autoencoder,ldm} --config FILE [key=value ...]`.

    python -m ldm.train autoencoder --config configs/shapes/autoencoder.yaml
    python -m ldm.train ldm --config configs/shapes/ldm.yaml first_stage=runs/shapes_ae/model
    python -m ldm.train ldm --config configs/shapes/ldm.yaml --resume
    python -m ldm.train ldm --config my.yaml --init-from runs/shapes_ldm/model   # fine-tune
    torchrun --nproc_per_node 2 -m ldm.train ldm --config configs/shapes/ldm.yaml

Any config field can be overridden as dotted `key=value` (YAML value syntax). Output goes to
`train.out_dir`: checkpoints/last.pt (training state), model/ (inference weights, EMA
included), metrics.jsonl, samples/*.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from ldm.config import ConfigError, apply_overrides, load_yaml, to_dict
from ldm.data.imagefolder import DataError, ImageFolderDataset, collate
from ldm.data.shapes import ShapesDataset
from ldm.training.config import AutoencoderTrainConfig, DataConfig, LDMTrainConfig
from ldm.training.loop import Trainer

log = logging.getLogger("ldm.train")
STAGES = {"autoencoder": AutoencoderTrainConfig, "ldm": LDMTrainConfig}


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset | None]:
    """Training and validation sets; validation is None when nothing is held out.

    `data.val_length=0` turns validation off. `shapes` draws `val_length` fresh items (seed + 1).
    `imagefolder` holds out its last `min(val_length, len // 10)` images, so at least 9 in 10
    images always train: a folder of fewer than 10 images trains on all of them without
    validation, and the log says so (set `data.val_length=0` to say that on purpose).
    """
    if cfg.val_length < 0:
        raise ConfigError(f"data.val_length={cfg.val_length} must be >= 0 (0 = no validation)")
    if cfg.name == "shapes":
        return (ShapesDataset(cfg.size, cfg.length, cfg.seed),
                ShapesDataset(cfg.size, cfg.val_length, cfg.seed + 1) if cfg.val_length else None)
    if cfg.root is None:
        raise ConfigError("data.root is required for data.name=imagefolder")
    full = ImageFolderDataset(cfg.root, cfg.size)
    n_val = min(cfg.val_length, len(full) // 10)
    if n_val < cfg.val_length:
        log.log(logging.WARNING if n_val == 0 else logging.INFO,
                "imagefolder: %d images; holding out %d for validation instead of "
                "data.val_length=%d (at most 1 in 10)%s", len(full), n_val, cfg.val_length,
                "; validation is off" if n_val == 0 else "")
    return (Subset(full, range(len(full) - n_val)),
            Subset(full, range(len(full) - n_val, len(full))) if n_val else None)


def load_config(stage: str, path: str | None, overrides: list[str]):
    cls = STAGES[stage]
    cfg = load_yaml(cls, path) if path else cls()
    return apply_overrides(cfg, overrides)


def autoencoder_task(cfg: AutoencoderTrainConfig, train_set: Dataset, val_set: Dataset | None,
                     init_from: str | None):
    from ldm.training.autoencoder_task import AutoencoderTask

    # The sample grid shows reconstructions of held-out images, or of training images when
    # validation is off (they still show how the autoencoder is doing, just not generalisation).
    shown = val_set if val_set is not None else train_set
    val_images = collate([shown[i] for i in range(min(8, len(shown)))])["image"]
    task = AutoencoderTask(cfg.model, val_images, cfg.freeze_encoder)
    if init_from:
        from ldm.pretrained import load_pretrained

        src = load_pretrained(init_from, strict=False)
        missing, unexpected = task.model.load_state_dict(src.state_dict(), strict=False)
        if unexpected or any(not k.startswith("loss.") for k in missing):
            raise ConfigError(f"--init-from {init_from} does not match model: missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]}")
        log.info("init from %s (%d loss keys initialised fresh)", init_from, len(missing))
    return task


def ldm_task(cfg: LDMTrainConfig, train_set, init_from: str | None, compvis_config: str | None):
    from ldm.pretrained import load_pretrained, read_config
    from ldm.training.ldm_task import LDMTask

    first_stage_state = None
    if init_from:  # fine-tuning: the checkpoint decides the architecture
        if init_from.endswith(".ckpt"):
            from ldm.compat import load_compvis

            if not compvis_config:
                raise ConfigError("--init-from a CompVis .ckpt needs --compvis-config YAML")
            src = load_compvis(compvis_config, init_from)
        else:
            src = load_pretrained(init_from)
        cfg = dataclasses.replace(cfg, model=src.config)
    elif cfg.first_stage:
        kind, ae_cfg = read_config(cfg.first_stage)
        if kind != "autoencoder":
            raise ConfigError(f"first_stage={cfg.first_stage} is a {kind} checkpoint")
        model_cfg = dataclasses.replace(
            cfg.model, first_stage=dataclasses.replace(ae_cfg, lossconfig=None))
        cfg = dataclasses.replace(cfg, model=model_cfg)
        ae = load_pretrained(cfg.first_stage, strict=True)
        first_stage_state = {k: v for k, v in ae.state_dict().items() if not k.startswith("loss.")}
    else:
        raise ConfigError("ldm training needs first_stage=<autoencoder folder> or --init-from")

    if not init_from and cfg.model.diffusion.scale_factor <= 0:
        # Rombach et al. sec. 4.3.2 / scale_by_std: unit-variance latents from the first batch,
        # encoded by the first stage loaded above.
        batch = collate([train_set[i] for i in range(min(256, len(train_set)))])
        with torch.no_grad():
            std = ae.encode(batch["image"]).sample(torch.Generator().manual_seed(0)).std()
        d = dataclasses.replace(cfg.model.diffusion, scale_factor=float(1.0 / std))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, diffusion=d))
        log.info("scale_factor = 1/std(z) = %.5f", d.scale_factor)

    task = LDMTask(cfg.model, cfg.ema_decay, cfg.sample_steps, cfg.sample_guidance)
    if init_from:
        task.model.load_state_dict(src.state_dict())
    else:
        task.model.first_stage_model.load_state_dict(first_stage_state)
    return task, cfg


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.train", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--resume", action="store_true", help="continue from out_dir/checkpoints")
    p.add_argument("--init-from", help="fine-tune from our checkpoint folder or a CompVis .ckpt")
    p.add_argument("--compvis-config", help="CompVis YAML for an --init-from .ckpt")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        cfg = load_config(args.stage, args.config, args.overrides)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        train_set, val_set = build_datasets(cfg.data)
        if args.stage == "autoencoder":
            task = autoencoder_task(cfg, train_set, val_set, args.init_from)
        else:
            task, cfg = ldm_task(cfg, train_set, args.init_from, args.compvis_config)
        trainer = Trainer(task, cfg.train, cfg.optim, cfg.data.seed, train_set, val_set,
                          to_dict(cfg), num_workers=cfg.data.num_workers)
        if args.resume:
            trainer.resume()
        trainer.fit()
    except (ConfigError, DataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
