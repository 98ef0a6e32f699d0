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
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch.utils.data import Dataset, Subset

from ldm.config import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from ldm.data.imagefolder import DataError, ImageFolderDataset, collate
from ldm.data.shapes import ShapesDataset
from ldm.training.config import AutoencoderTrainConfig, DataConfig, LDMTrainConfig
from ldm.training.derive import autoencoder_sizes, dotted_keys, given_keys, ldm_sizes, settle
from ldm.training.loop import Trainer

log = logging.getLogger("ldm.train")
STAGES = {"autoencoder": AutoencoderTrainConfig, "ldm": LDMTrainConfig}


def build_datasets(cfg: DataConfig) -> tuple[Dataset, Dataset | None]:
    """Training and validation sets; validation is None when nothing is held out.

    `data.val_length=0` turns validation off. `shapes` draws `val_length` fresh items (seed + 1).
    `imagefolder` validates on `data.val_root` when given, else holds out a random subset of
    `min(val_length, len // 10)` images drawn with `data.seed` (the same images on every run
    and resume), so at least 9 in 10 images always train: a folder of fewer than 10 images
    trains on all of them without validation, and the log says so.
    """
    if cfg.val_length < 0:
        raise ConfigError(f"data.val_length={cfg.val_length} must be >= 0 (0 = no validation)")
    if cfg.name == "shapes":
        return (ShapesDataset(cfg.size, cfg.length, cfg.seed),
                ShapesDataset(cfg.size, cfg.val_length, cfg.seed + 1) if cfg.val_length else None)
    if cfg.root is None:
        raise ConfigError("data.root is required for data.name=imagefolder")
    full = ImageFolderDataset(cfg.root, cfg.size, cfg.background)
    if cfg.val_root is not None:
        val = ImageFolderDataset(cfg.val_root, cfg.size, cfg.background) if cfg.val_length else None
        log.info("imagefolder: %d training images, %s", len(full),
                 f"{len(val)} validation images from {cfg.val_root}" if val else "no validation")
        return full, val
    n_val = min(cfg.val_length, len(full) // 10)
    if n_val < cfg.val_length:
        log.log(logging.WARNING if n_val == 0 else logging.INFO,
                "imagefolder: %d images; holding out %d for validation instead of "
                "data.val_length=%d (at most 1 in 10)%s", len(full), n_val, cfg.val_length,
                "; validation is off" if n_val == 0 else "")
    held = set(torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed))
               [:n_val].tolist())
    if n_val:
        log.info("imagefolder: %d images, %d held out for validation (a random subset drawn "
                 "with data.seed=%d; data.val_length=0 for none, data.val_root for a folder)",
                 len(full), n_val, cfg.seed)
    return (Subset(full, [i for i in range(len(full)) if i not in held]),
            Subset(full, sorted(held)) if n_val else None)


def load_config(stage: str, path: str | None, overrides: list[str],
                resume: str | None = None) -> tuple[object, set[str]]:
    """(the typed config, the dotted keys the run set). With `resume` (a run folder, or ""
    for the `train.out_dir` of `path` + `overrides`) the run's own `config.json` is the base
    and the overrides apply on top of it."""
    cls = STAGES[stage]
    cfg = load_yaml(cls, path) if path else cls()
    cfg = apply_overrides(cfg, overrides)
    if resume is None:
        return cfg, given_keys(path, overrides)
    saved = Path(resume or cfg.train.out_dir) / "config.json"
    if not saved.is_file():
        raise FileNotFoundError(f"--resume: no run config at {saved} (train first, or give "
                                "the run's folder: --resume RUN_DIR)")
    data = json.loads(saved.read_text())
    if path:
        log.info("--resume: the run's own %s is the config; --config %s is not read", saved,
                 path)
    cfg = apply_overrides(from_dict(cls, data), overrides)
    if Path(cfg.train.out_dir).resolve() != saved.parent.resolve():
        raise ConfigError(f"--resume {saved.parent}: train.out_dir={cfg.train.out_dir} is "
                          "another folder (leave train.out_dir out to continue this run)")
    return cfg, given_keys(None, overrides, base=data)


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


def ldm_config(cfg: LDMTrainConfig, init_from: str | None, compvis_config: str | None,
               given: set[str]) -> LDMTrainConfig:
    """The model config the run trains: the --init-from checkpoint's (fine-tuning: it decides
    the architecture, and data.size follows it unless set), or the config's with the first
    stage's autoencoder; latent size and channels derived (ldm/training/derive.py)."""
    from ldm.pretrained import read_config

    if init_from:
        if init_from.endswith(".ckpt"):
            from ldm.compat import ldm_config as compvis_ldm_config

            if not compvis_config:
                raise ConfigError("--init-from a CompVis .ckpt needs --compvis-config YAML")
            model = compvis_ldm_config(yaml.safe_load(Path(compvis_config).read_text())["model"])
        else:
            model = read_config(init_from)[1]
        cfg = dataclasses.replace(cfg, model=model)
        f = 2 ** (len(model.first_stage.ddconfig.ch_mult) - 1)
        cfg = settle(cfg, {"data.size": model.latent_size * f}, given,
                     f"the --init-from checkpoint's {model.latent_size}x{model.latent_size} "
                     f"latents at f={f}")
        return ldm_sizes(cfg, {*given, *_model_keys(cfg)})
    if not cfg.first_stage:
        raise ConfigError("ldm training needs first_stage=<autoencoder folder> or --init-from")
    kind, ae_cfg = read_config(cfg.first_stage)
    if kind != "autoencoder":
        raise ConfigError(f"first_stage={cfg.first_stage} is a {kind} checkpoint")
    model_cfg = dataclasses.replace(cfg.model,
                                    first_stage=dataclasses.replace(ae_cfg, lossconfig=None))
    return ldm_sizes(dataclasses.replace(cfg, model=model_cfg), given)


def ldm_task(cfg: LDMTrainConfig, train_set, val_set, init_from: str | None,
             compvis_config: str | None):
    """(the LDM task with its weights loaded, the config with the estimated scale_factor)."""
    from ldm.pretrained import load_pretrained
    from ldm.training.ldm_task import LDMTask

    if init_from and init_from.endswith(".ckpt"):
        from ldm.compat import load_compvis

        src = load_compvis(compvis_config, init_from)
    elif init_from:
        src = load_pretrained(init_from)
    else:
        ae = load_pretrained(cfg.first_stage, strict=True)
    if not init_from and cfg.model.diffusion.scale_factor <= 0:
        # Rombach et al. sec. 4.3.2 / scale_by_std: unit-variance latents from the first batch,
        # encoded by the first stage loaded above.
        batch = collate([train_set[i] for i in range(min(256, len(train_set)))])
        with torch.no_grad():
            std = ae.encode(batch["image"]).sample(torch.Generator().manual_seed(0)).std()
        d = dataclasses.replace(cfg.model.diffusion, scale_factor=float(1.0 / std))
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, diffusion=d))
        log.info("scale_factor = 1/std(z) = %.5f", d.scale_factor)

    task = LDMTask(cfg.model, cfg.ema_decay, cfg.sample_steps, cfg.sample_guidance,
                   grid_captions(val_set if val_set is not None else train_set))
    if init_from:
        task.model.load_state_dict(src.state_dict())
    else:
        task.model.first_stage_model.load_state_dict(
            {k: v for k, v in ae.state_dict().items() if not k.startswith("loss.")})
    return task, cfg


def grid_captions(dataset: Dataset, n: int = 8) -> list[str]:
    """The first `n` distinct captions of `dataset`, read without decoding images where the
    data set keeps its metadata (imagefolder)."""
    rows = getattr(dataset, "rows", None)
    if rows is None and isinstance(dataset, Subset) and hasattr(dataset.dataset, "rows"):
        rows = [dataset.dataset.rows[i] for i in dataset.indices]
    texts = ([r["text"] for r in rows] if rows is not None
             else (dataset[i]["caption"] for i in range(min(len(dataset), 64))))
    return list(dict.fromkeys(texts))[:n]


def _model_keys(cfg) -> set[str]:
    """Every model field: a fine-tuned checkpoint fixes them all (data.size must fit it)."""
    return set(dotted_keys(to_dict(cfg.model), "model."))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldm.train", description=__doc__.split("\n")[0])
    p.add_argument("stage", choices=sorted(STAGES))
    p.add_argument("--config", help="YAML config file")
    p.add_argument("--resume", nargs="?", const="", default=None, metavar="RUN_DIR",
                   help="continue a run from its checkpoint and its own config.json (RUN_DIR, "
                        "or train.out_dir of --config); overrides apply on top")
    p.add_argument("--init-from", help="fine-tune from our checkpoint folder or a CompVis .ckpt")
    p.add_argument("--compvis-config", help="CompVis YAML for an --init-from .ckpt")
    p.add_argument("overrides", nargs="*", help="dotted key=value config overrides")
    args = p.parse_intermixed_args(argv)
    if args.resume and "=" in args.resume:  # `--resume key=value`: an override, not a folder
        args.overrides.insert(0, args.resume)
        args.resume = ""
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    try:
        cfg, given = load_config(args.stage, args.config, args.overrides, args.resume)
        if args.stage == "autoencoder":
            cfg = autoencoder_sizes(cfg, given)
        else:
            cfg = ldm_config(cfg, args.init_from, args.compvis_config, given)
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        torch.manual_seed(cfg.train.seed)
        train_set, val_set = build_datasets(cfg.data)
        if args.stage == "autoencoder":
            task = autoencoder_task(cfg, train_set, val_set, args.init_from)
        else:
            task, cfg = ldm_task(cfg, train_set, val_set, args.init_from, args.compvis_config)
        trainer = Trainer(task, cfg.train, cfg.optim, cfg.data.seed, train_set, val_set,
                          to_dict(cfg), num_workers=cfg.data.num_workers)
        if args.resume is not None:
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
