"""Training configs derive what the data and the first stage already fix, and refuse
contradictions instead of training the wrong model.

- autoencoder: `model.ddconfig.resolution` is `data.size`;
- ldm: the latent side h = data.size / f (f = 2^(levels - 1) of the first stage's
  `ch_mult`) is `model.diffusion.image_size` and `model.unet.image_size` (the sampler's size
  and the UNet's), and the latent channels (the first stage's `embed_dim`) are
  `model.diffusion.channels`, `model.unet.in_channels` and `model.unet.out_channels`.

A field the run's config sets (in the YAML file or as a key=value override) that disagrees is
a ConfigError naming both values; a field it leaves to the default is derived, and the log
says so. Set `data.size` and the rest follows.
"""
from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import yaml

from ldm.config import ConfigError

log = logging.getLogger(__name__)


def given_keys(config_path: str | Path | None, overrides: list[str],
               base: dict | None = None) -> set[str]:
    """Dotted keys the run's config sets: the YAML file's (or `base`, a whole saved config)
    and the overrides'."""
    data = base if base is not None else (
        yaml.safe_load(Path(config_path).read_text()) or {} if config_path else {})
    keys = set(dotted_keys(data))
    keys.update(item.split("=", 1)[0] for item in overrides if "=" in item)
    return keys


def dotted_keys(data: Any, prefix: str = "") -> list[str]:
    """The dotted paths of a nested dict's leaves, each after `prefix`."""
    if not isinstance(data, dict):
        return [prefix[:-1]] if prefix else []
    out = []
    for k, v in data.items():
        out += dotted_keys(v, f"{prefix}{k}.")
    return out


def settle(cfg: Any, values: dict[str, Any], given: set[str], why: str) -> Any:
    """`cfg` with each dotted field of `values` set: a given field that differs is an error."""
    for key, want in values.items():
        have = _get(cfg, key)
        if have == want:
            continue
        if key in given:
            raise ConfigError(f"{key}={have} contradicts {why}: it must be {want} (or leave it "
                              "out and it is derived)")
        log.info("%s = %s (derived: %s)", key, want, why)
        cfg = _set(cfg, key.split("."), want)
    return cfg


def autoencoder_sizes(cfg: Any, given: set[str]) -> Any:
    return settle(cfg, {"model.ddconfig.resolution": cfg.data.size}, given,
                  f"data.size={cfg.data.size}")


def ldm_sizes(cfg: Any, given: set[str]) -> Any:
    """Latent size and channels from data.size and the first stage (cfg.model.first_stage)."""
    first = cfg.model.first_stage
    f = 2 ** (len(first.ddconfig.ch_mult) - 1)
    if cfg.data.size % f:
        raise ConfigError(f"data.size={cfg.data.size} is not a multiple of the first stage's "
                          f"downsampling factor {f}")
    side, channels = cfg.data.size // f, first.embed_dim
    why = f"data.size={cfg.data.size} / f={f} with {channels} latent channels"
    return settle(cfg, {"model.diffusion.image_size": side, "model.unet.image_size": side,
                        "model.diffusion.channels": channels,
                        "model.unet.in_channels": channels,
                        "model.unet.out_channels": channels}, given, why)


def _get(obj: Any, key: str) -> Any:
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _set(obj: Any, parts: list[str], value: Any) -> Any:
    if len(parts) == 1:
        return dataclasses.replace(obj, **{parts[0]: value})
    child = _set(getattr(obj, parts[0]), parts[1:], value)
    return dataclasses.replace(obj, **{parts[0]: child})
