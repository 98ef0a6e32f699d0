"""Add the pipeline models (`ldm_txt2img`, `ldm_txt2img_stream`) to a built Triton repository.

    python -m server.repository model_repository        # after export/build_engines.py
    assemble(Path("model_repository"), PipelineOptions(instances=2))
    assemble(Path("emoji_repository"), PipelineOptions(name="emoji"))  # emoji_txt2img, ...

A repository is one served model, named by `PipelineOptions.name` (default `ldm`): its
pipeline models are `<name>_txt2img` and `<name>_txt2img_stream`, and its networks carry the
prefix the export gave them (`--name-prefix emoji_`: `emoji_unet`; the default name's are
plain). Several repositories of different names are served by one Triton.

The serving side's step on top of what export/build_engines.py writes: it reads only the
repository (`manifest.json`: the networks' tensors and profiles; `model_config.yaml`: the
model's config; `alphas_cumprod.npy`: its schedule), never the checkpoint. `python -m
server` runs it after every export.

`ldm_txt2img_stream` (decoupled) holds the networks and runs the loop; `ldm_txt2img` is a
thin front that passes each request on to it through BLS, so the weights are resident once
for both endpoints. Each pipeline model folder holds:

    config.pbtxt            inputs, outputs, limits and serving options as `parameters`
    1/model.py              from server/triton_models/<name>/; it imports the installed
                            package (`pip install -e .`, as `make setup` and the Dockerfile do)
    1/tokenizer/            the text encoder's tokenizer (tokenizer.json, vocab.txt)
    1/alphas_cumprod.npy    the (T,) float32 abar_t of the model's schedule
    1/pipeline.json         latent shape facts, the networks' tensor names, ONNX paths and
                            max batches (server.contract.PipelineInfo)
"""
from __future__ import annotations

import argparse
import logging
import re
import shutil
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from export.cache import make_temp_dir
from export.manifest import TORCH_WEIGHTS, read_manifest
from export.triton_config import base_config, config_text, tensor_config
from server.contract import (
    ALPHAS_FILE,
    DEFAULT_NAME,
    INPUTS,
    NAME_PATTERN,
    NETWORKS,
    OUTPUTS,
    PIPELINE_MODELS,
    PROGRESS_OUTPUTS,
    REQUIRED_INPUTS,
    TOKENIZER_DIR,
    Limits,
    NetworkTarget,
    PipelineInfo,
    ServingOptions,
    is_streaming,
    network_prefix,
    pipeline_names,
    served_name,
)
from server.pipeline_facts import default_limits, default_networks, large_model_caps

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "triton_models"
MODEL_CONFIG = "model_config.yaml"  # export.repository.MODEL_CONFIG
SCHEDULE = "alphas_cumprod.npy"  # export.repository.SCHEDULE


@dataclass(frozen=True)
class PipelineOptions:
    name: str = DEFAULT_NAME  # the served model's name: <name>_txt2img, <name>_txt2img_stream
    models: tuple[str, ...] = ()  # which of those to write (both are needed); (): both
    # Instances of `ldm_txt2img`, the thin front (its threads wait on BLS). The streaming
    # model, which holds the networks, always has one: the weights are resident once.
    instances: int = 1
    limits: dict[str, Any] = field(default_factory=dict)  # Limits fields over the derived ones
    serving: dict[str, Any] = field(default_factory=dict)  # ServingOptions fields; `networks`
    # and `precision` default to default_networks(backend)

    def __post_init__(self) -> None:
        if not re.fullmatch(NAME_PATTERN, self.name):
            raise ValueError(f"model name {self.name!r}: lower-case letters, digits and dashes")
        names = pipeline_names(self.name)
        if not self.models:
            object.__setattr__(self, "models", names)
        bad = [n for n in self.models if n not in names]
        if bad:
            raise ValueError(f"unknown pipeline model(s) {bad}; allowed: {list(names)}")
        if names[1] not in self.models:
            raise ValueError(f"{names[0]} passes its requests to {names[1]} (the model that "
                             "holds the networks): write both")
        if self.instances < 1:
            raise ValueError(f"pipeline instances must be >= 1, got {self.instances}")


class Built:
    """What export/build_engines.py wrote: the manifest's networks and the model's config."""

    def __init__(self, repo: Path):
        from ldm.config import LDMConfig, from_dict

        self.repo = Path(repo)
        manifest = read_manifest(self.repo)
        if manifest is None:
            raise FileNotFoundError(f"{repo} has no manifest.json: build it first "
                                    "(python export/build_engines.py --out ...)")
        self.backend: str = manifest["backend"]
        self.networks: dict[str, dict] = manifest["models"]
        self.prefix: str = manifest.get("name_prefix", "")  # of the networks' model names
        data = yaml.safe_load((self.repo / manifest.get("model_config", MODEL_CONFIG))
                              .read_text())
        self.config = from_dict(LDMConfig, data["config"])
        schedule = self.repo / manifest.get("schedule", SCHEDULE)
        if not schedule.is_file():
            raise FileNotFoundError(f"{repo} has no {schedule.name}: it was built by an older "
                                    "version; rebuild it (python export/build_engines.py "
                                    "--force ...)")
        self.alphas_cumprod = np.load(schedule).astype(np.float32)

    def network_bytes(self, name: str) -> int:
        """Bytes of the files a network's model serves (its weights, nearly all)."""
        folder = self.repo / f"{self.prefix}{name}" / "1"
        return sum(f.stat().st_size for f in folder.iterdir() if f.is_file())

    @cached_property
    def tokenizer(self):
        """The text encoder's tokenizer (BERT or CLIP), loaded once for both models."""
        from ldm.modules.conditioning import load_tokenizer

        return load_tokenizer(self.config.cond_stage)

    @cached_property
    def pipeline_info(self) -> PipelineInfo:
        targets = {name: _target(self.prefix + name, self.networks[name],
                                 self.backend != "tensorrt") for name in NETWORKS}
        cfg = self.config
        return PipelineInfo(
            latent_channels=cfg.unet.in_channels,
            downsample_factor=2 ** (len(cfg.first_stage.ddconfig.ch_mult) - 1),
            parameterization=cfg.diffusion.parameterization,
            max_seq_len=cfg.cond_stage.max_seq_len,
            scale_factor=float(cfg.diffusion.scale_factor), **targets)


def _target(name: str, entry: dict, onnx: bool) -> NetworkTarget:
    """A network as the loop calls it, from its manifest entry (export/steps.py)."""
    batched = entry["max_batch_size"] > 0
    # A batched (B,) tensor is declared `dims: [1] reshape: { shape: [] }`: sent as (B, 1).
    unsqueeze = [t["name"] for t in entry["inputs"] if batched and list(t["shape"]) == ["batch"]]
    return NetworkTarget(model=name, inputs=[t["name"] for t in entry["inputs"]],
                         output=entry["outputs"][0]["name"], unsqueeze=unsqueeze,
                         onnx=f"{name}/1/model.onnx" if onnx else None,
                         max_batch=entry["max_batch_size"] or entry["profile"]["batch"][2])


def assemble(repo: Path, options: PipelineOptions = PipelineOptions()) -> list[str]:
    """Write the pipeline models into `repo`; the names written ([] when the repository lacks
    a network the pipeline calls, with a warning). Each model folder is written beside the
    repository and moved in whole."""
    built = Built(repo)
    missing = [m for m in NETWORKS if m not in built.networks]
    if missing:
        log.warning("pipeline models not written: the repository lacks %s", missing)
        return []
    if not built.config.cond_stage.use_tokenizer:
        raise ValueError("the pipeline needs a text encoder with a tokenizer (BERTEmbedder "
                         "or FrozenCLIPEmbedder with use_tokenizer=true)")
    if built.prefix != network_prefix(options.name):
        raise ValueError(f"{repo}: its networks are named {built.prefix or '(no prefix)'}"
                         f"unet..., the served model {options.name!r} needs "
                         f"{network_prefix(options.name) or '(no prefix)'}unet...: build it "
                         f"with --name {options.name} (python -m server.build)")
    limits = default_limits(built.config, built.networks, options.limits)
    serving = _serving_options(built, options.serving)
    for name in options.models:
        _write_model(built, name, limits, serving,
                     1 if is_streaming(name) else options.instances)
    log.info("wrote pipeline models %s (sizes %s, up to %d images, %d steps)",
             list(options.models), list(limits.sizes), limits.max_images, limits.max_steps)
    return list(options.models)


def _serving_options(built: Built, overrides: dict[str, Any]) -> ServingOptions:
    latent = built.networks["unet"]["profile"]["height"][2]  # the largest served
    defaults = {**default_networks(built.backend, overrides),
                **large_model_caps(built.network_bytes("unet"), latent)}
    serving = ServingOptions(**{**defaults, **overrides})
    if serving.networks in ("onnxruntime", "openvino") and built.backend == "tensorrt":
        raise ValueError(f"networks={serving.networks} needs ONNX files; a TensorRT repository "
                         "has engines only: use networks=bls or torch")
    if serving.networks == "torch" and not (built.repo / TORCH_WEIGHTS / "config.yaml").is_file():
        raise ValueError(f"networks=torch needs the networks' PyTorch weights in "
                         f"{built.repo / TORCH_WEIGHTS}: build with --torch-weights "
                         "(python -m server.build --networks torch writes them)")
    return serving


def _write_model(built: Built, name: str, limits: Limits, serving: ServingOptions,
                 instances: int) -> None:
    final = built.repo / name
    tmp = make_temp_dir(built.repo.resolve().parent, name)
    try:
        version = tmp / "1"
        version.mkdir()
        template = PIPELINE_MODELS[1] if is_streaming(name) else PIPELINE_MODELS[0]
        shutil.copy2(TEMPLATES / template / "model.py", version / "model.py")
        built.tokenizer.save(version / TOKENIZER_DIR)
        np.save(version / ALPHAS_FILE, built.alphas_cumprod)
        built.pipeline_info.save(version)
        (tmp / "config.pbtxt").write_text(config_text(
            pipeline_config(name, limits, serving, instances),
            "Written by server/repository.py; the parameters are the request limits and the "
            "serving options,\nand may be edited (a bad value stops the model from loading, "
            "with a message saying why)."))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def pipeline_config(name: str, limits: Limits, serving: ServingOptions, instances: int = 1):
    """The ModelConfig of a pipeline model: one request = one prompt (max_batch_size 0)."""
    cfg = base_config(name, backend="python", instances=instances,
                      parameters={**limits.to_parameters(), **serving.to_parameters()})
    cfg.input.extend(tensor_config(n, dtype, [1], optional=n not in REQUIRED_INPUTS)
                     for n, (dtype, _) in INPUTS.items())
    outputs = {**(PROGRESS_OUTPUTS if is_streaming(name) else {}), **OUTPUTS}
    cfg.output.extend(tensor_config(n, dtype, dims, output=True)
                      for n, (dtype, dims) in outputs.items())
    if is_streaming(name):
        cfg.model_transaction_policy.decoupled = True
    return cfg


def read_pipeline_config(folder: Path) -> tuple[Limits, ServingOptions, int]:
    """(limits, serving options, instance count) from a pipeline model's config.pbtxt,
    parsed with Triton's own schema."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    cfg = text_format.Parse((Path(folder) / "config.pbtxt").read_text(),
                            model_config_pb2.ModelConfig())
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    instances = sum(g.count or 1 for g in cfg.instance_group) or 1
    return Limits.from_parameters(params), ServingOptions.from_parameters(params), instances


def served_models(repo: Path, components: bool = False) -> tuple[str, ...]:
    """The models Triton should load from `repo`: the pipeline models, plus the networks'
    own models where the pipeline calls them (networks: bls) or `components` asks for them.
    With `networks: onnxruntime` the pipeline runs the graphs itself, and loading the
    component models too would hold every weight a second time."""
    repo = Path(repo)
    every = tuple(sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").is_file()))
    # Front before stream, as pipeline_names gives them.
    pipeline = tuple(sorted((m for m in every if served_name(m)), key=is_streaming))
    if components or not pipeline:
        return every
    _, serving, _ = read_pipeline_config(repo / pipeline[-1])
    return every if serving.networks == "bls" else pipeline


def repository_name(repo: Path) -> str:
    """The served model's name a built repository's networks were named for."""
    manifest = read_manifest(Path(repo)) or {}
    prefix = manifest.get("name_prefix", "")
    return prefix[:-1] if prefix else DEFAULT_NAME


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.repository",
                                description=__doc__.split("\n")[0])
    p.add_argument("repository", type=Path, help="a repository export/build_engines.py wrote")
    p.add_argument("--instances", type=int, default=1, help="instances of <name>_txt2img")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        options = PipelineOptions(name=repository_name(args.repository),
                                  instances=args.instances)
        names = assemble(args.repository, options)
    except (ValueError, FileNotFoundError) as e:
        print(f"server.repository: error: {e}", file=sys.stderr)
        return 1
    print(f"{args.repository}: wrote {', '.join(names) or 'no pipeline models'}")
    return 0 if names else 1


if __name__ == "__main__":
    sys.exit(main())
