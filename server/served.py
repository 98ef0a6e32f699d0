"""The models `python -m server` serves, and their Triton repositories.

The main model is `--checkpoint` (or the one `--repository` was built from, else the demo),
named `--name`; each `--model NAME=CHECKPOINT` adds one, built into `<repository>-NAME`.
Each repository is built or reused by `python -m server.build --name NAME` in a process of
its own, and all of them are served by one Triton (server/launcher.py).
"""
from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from server.contract import NAME_PATTERN, pipeline_names

log = logging.getLogger("server.launcher")

DEFAULT_CHECKPOINT = Path("checkpoints/demo/ldm")


@dataclass(frozen=True)
class ServedModel:
    """One model the launcher serves: its name (the API's `model`), where it comes from, and
    the Triton repository it is built into."""

    name: str
    checkpoint: Path
    compvis_config: Path | None
    repository: Path


def served_models_of(args: argparse.Namespace) -> list[ServedModel]:
    """The main model (--checkpoint, --name, --repository), then each --model NAME=CKPT,
    built into <repository>-<NAME>."""
    resolve_checkpoint(args)
    models = [ServedModel(args.name, args.checkpoint, args.compvis_config, args.repository)]
    for name, checkpoint, compvis in args.model:
        folder = args.repository.with_name(f"{args.repository.name}-{name}")
        models.append(ServedModel(name, checkpoint, compvis, folder))
    return models


def resolve_checkpoint(args: argparse.Namespace) -> None:
    """--checkpoint left out: the repository's own checkpoint when it has a manifest (so a
    repository built from a user's model is never rebuilt from the demo), else the demo."""
    if args.checkpoint is not None:
        return
    from export.manifest import read_manifest  # light: json and hashlib only

    built = (read_manifest(args.repository) or {}).get("checkpoint") or {}
    if built.get("path"):
        args.checkpoint = Path(built["path"])
        if args.compvis_config is None and built.get("compvis_config"):
            args.compvis_config = Path(built["compvis_config"])
        log.info("serving %s, built from %s", args.repository, args.checkpoint)
    else:
        args.checkpoint = DEFAULT_CHECKPOINT


def ensure_repository(args: argparse.Namespace, model: ServedModel) -> None:
    """Build or reuse `model.repository` from `model.checkpoint` (server/build.py, in a
    process of its own: its peak memory, a model's weights and more, is returned to the
    system before Triton loads, and this process stays small while it serves)."""
    repo, checkpoint = model.repository, model.checkpoint
    if args.no_export or not checkpoint.exists():
        if not (repo / "manifest.json").is_file():
            why = "--no-export" if args.no_export else f"checkpoint {checkpoint} not found"
            raise SystemExit(f"error: {why}, and {repo} holds no built repository "
                             "(train one, or pass --checkpoint)")
        if not args.no_export:
            log.warning("checkpoint %s not found: serving %s as it is", checkpoint, repo)
        if not (repo / pipeline_names(model.name)[1] / "config.pbtxt").is_file():
            _child(["server.repository", str(repo)], repo)
        return
    if checkpoint.is_file() and model.compvis_config is None:
        raise SystemExit(f"error: --checkpoint {checkpoint} is a file: a CompVis "
                         ".ckpt/.safetensors needs --compvis-config")
    argv = ["--checkpoint", str(checkpoint), "--out", str(repo), "--name", model.name,
            "--backend", args.backend, "--work-dir", str(args.work_dir), "--quiet",
            "--keep-builds", str(args.keep_builds)]
    if model.compvis_config is not None:
        argv += ["--compvis-config", str(model.compvis_config)]
    for flag in ("networks", "precision"):
        if getattr(args, flag) is not None:
            argv += [f"--{flag}", getattr(args, flag)]
    argv += ["--unsafe-allow-pickle"] * args.unsafe_allow_pickle + ["--replace"] * args.replace
    print(f"checking the Triton repository {repo} against {checkpoint} "
          "(exports only what changed)", flush=True)
    _child(["server.build", *argv], repo)


def _child(module_argv: list[str], repository: Path) -> None:
    """`python -m <module_argv>` in a process of its own; exit when it fails."""
    code = subprocess.call([sys.executable, "-m", *module_argv])
    if code != 0:
        raise SystemExit(f"error: could not build {repository} (see above)")



def model_argument(p: argparse.ArgumentParser, item: str) -> tuple[str, Path, Path | None]:
    """--model NAME=CHECKPOINT[@COMPVIS_YAML] -> (name, checkpoint, compvis config)."""
    name, sep, rest = item.partition("=")
    if not sep or not re.fullmatch(NAME_PATTERN, name) or not rest:
        p.error(f"--model {item!r}: expected NAME=CHECKPOINT (NAME: lower-case letters, "
                "digits and dashes)")
    checkpoint, _, compvis = rest.partition("@")
    if not Path(checkpoint).exists():
        p.error(f"--model {item!r}: checkpoint {checkpoint} not found")
    if compvis and not Path(compvis).is_file():
        p.error(f"--model {item!r}: CompVis config {compvis} not found")
    return name, Path(checkpoint), Path(compvis) if compvis else None
