"""Our checkpoint format: a folder with `model.safetensors` and `config.yaml`.

`config.yaml` holds `kind` (`autoencoder` or `ldm`), the model's typed config and, for a
packed LDM, optionally `sampling`: the steps, guidance scale and sampler it was evaluated at,
which the server and `ldm.sample` use when a request leaves them out (`ldm.pack
--default-guidance-scale ...`; like a language model's generation config). Safetensors cannot
carry code, unlike a pickled `.ckpt`, so these load without any trust decision.
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import torch
import yaml
from safetensors.torch import load_file, save_file

from ldm.checkpoints import assign_state, empty_weights, map_safetensors
from ldm.config import AutoencoderConfig, ConfigError, LDMConfig, from_dict, to_dict

Kind = Literal["autoencoder", "ldm"]
CONFIG_CLASSES: dict[str, type] = {"autoencoder": AutoencoderConfig, "ldm": LDMConfig}


def build_model(kind: str, cfg) -> torch.nn.Module:
    if kind == "autoencoder":
        from ldm.models.autoencoder import AutoencoderKL

        return AutoencoderKL(cfg)
    if kind == "ldm":
        from ldm.models.diffusion import LatentDiffusion

        return LatentDiffusion(cfg)
    raise ConfigError(f"unknown model kind {kind!r} (allowed: {', '.join(CONFIG_CLASSES)})")


# `sampling:` keys and their checks (the sampler names are ldm.samplers.SAMPLERS').
SAMPLING_KEYS = ("steps", "guidance_scale", "sampler")


def save_pretrained(folder: str | Path, model: torch.nn.Module, kind: Kind, cfg,
                    sampling: dict | None = None) -> None:
    """Write the folder atomically: build beside it, then swap it in. `sampling`: the
    model's sampling defaults (checked; see read_sampling)."""
    folder = Path(folder)
    header = {"kind": kind, "config": to_dict(cfg)}
    if sampling:
        header["sampling"] = check_sampling(sampling, "sampling")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes it 0700: readable like any folder
    try:
        # safetensors refuses shared storage; contiguous clones also drop any views.
        state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.yaml").write_text(yaml.safe_dump(header, sort_keys=False))
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def current_umask() -> int:
    """This process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def read_config(folder: str | Path):
    """(kind, typed config) of a checkpoint folder."""
    path = Path(folder) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{folder}: not one of our checkpoints (no config.yaml)")
    data = yaml.safe_load(path.read_text())
    kind = data.get("kind")
    if kind not in CONFIG_CLASSES:
        raise ConfigError(f"{path}: kind {kind!r} is not one of {list(CONFIG_CLASSES)}")
    return kind, from_dict(CONFIG_CLASSES[kind], data["config"])


def read_sampling(checkpoint: str | Path) -> dict:
    """The checkpoint's sampling defaults, checked: {} when it records none, and for what is
    not one of our folders (a CompVis file records none)."""
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return {}
    return check_sampling(yaml.safe_load(path.read_text()).get("sampling") or {},
                          f"{path}: sampling")


def check_sampling(sampling: dict, where: str) -> dict:
    """`sampling` with known keys and sound values, or a ConfigError naming the bad one."""
    from ldm.samplers import SAMPLERS

    unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {list(SAMPLING_KEYS)}")
    steps, guidance = sampling.get("steps"), sampling.get("guidance_scale")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ConfigError(f"{where}: steps must be an integer >= 1, got {steps!r}")
    if guidance is not None and (isinstance(guidance, bool)
                                 or not isinstance(guidance, (int, float))
                                 or not math.isfinite(guidance) or guidance < 0):
        raise ConfigError(f"{where}: guidance_scale must be a finite number >= 0, "
                          f"got {guidance!r}")
    if sampling.get("sampler") is not None and sampling["sampler"] not in SAMPLERS:
        raise ConfigError(f"{where}: sampler {sampling['sampler']!r} is not one of "
                          f"{sorted(SAMPLERS)}")
    out = {k: sampling[k] for k in SAMPLING_KEYS if sampling.get(k) is not None}
    if "guidance_scale" in out:
        out["guidance_scale"] = float(out["guidance_scale"])
    return out


def load_pretrained(folder: str | Path, strict: bool = True) -> torch.nn.Module:
    """Build the model from config.yaml and load model.safetensors (strict by default).

    Strict loads map the file and build the model without weights of its own (see
    ldm/checkpoints.py); non-strict ones keep the initialised weights the file lacks."""
    kind, cfg = read_config(folder)
    path = Path(folder) / "model.safetensors"
    if not strict:
        model = build_model(kind, cfg)
        model.load_state_dict(load_file(str(path)), strict=False)
        return model.eval()
    with empty_weights():
        model = build_model(kind, cfg)
    return assign_state(model, map_safetensors(path), str(path)).eval()
