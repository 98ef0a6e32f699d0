"""Write the pipeline models (`ldm_txt2img`, `ldm_txt2img_stream`) into a Triton repository.

Called by export/repository.py after it has written `text_encoder`, `unet` and `vae_decoder`:

    write_pipeline_models(repo_dir, model, specs, {"max_batch": 8, ...})

`ldm_txt2img_stream` (decoupled) holds the networks and runs the loop; `ldm_txt2img` is a
thin front that passes each request on to it through BLS and returns the final response, so
the weights are resident once for both endpoints. Each pipeline model folder is
self-contained:

    ldm_txt2img/config.pbtxt           inputs, outputs, limits as `parameters`
    ldm_txt2img/1/model.py             from server/triton_models/ldm_txt2img/
    ldm_txt2img/1/{ldm,server,export}/ the modules model.py imports (PIPELINE_SOURCES)
    ldm_txt2img/1/tokenizer/           BERT tokenizer (tokenizer.json, vocab.txt)
    ldm_txt2img/1/alphas_cumprod.npy   the model's (T,) float32 abar_t buffer
    ldm_txt2img/1/pipeline.json        latent shape facts, the networks' tensor names, ONNX
                                       paths and max batches (PipelineInfo)

The Python that runs them needs torch, numpy, einops, pyyaml and transformers, and for
`networks: onnxruntime` (the default with ONNX Runtime Python-backend networks, i.e. on the
CPU) onnx and onnxruntime: the pipeline then opens `<repository>/<network>/1/model.onnx`
itself. The streaming model has `max_batch_size` 0 and is decoupled; `ldm_txt2img` has
`max_batch_size` 0 too, but answers through response senders from its own threads.
"""
from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from server.limits import INPUTS, REQUIRED_INPUTS, Limits
from server.txt2img import (
    ALPHAS_FILE,
    TOKENIZER_DIR,
    PipelineInfo,
    ServingOptions,
)

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Path(__file__).resolve().parent / "triton_models"
PIPELINE_MODELS: tuple[str, ...] = ("ldm_txt2img", "ldm_txt2img_stream")
STREAMING = {"ldm_txt2img": False, "ldm_txt2img_stream": True}
BLS_TARGETS: tuple[str, ...] = ("text_encoder", "unet", "vae_decoder")
# Copied into each pipeline model's version folder (relative to the project root). A change in
# any of them changes the served pipeline: exporters should hash them with the repository.
PIPELINE_SOURCES: tuple[str, ...] = (
    "ldm/__init__.py", "ldm/config.py", "ldm/pipeline.py",
    "ldm/samplers/__init__.py", "ldm/samplers/ddim.py", "ldm/samplers/ddpm.py",
    "ldm/samplers/dpm_solver.py", "ldm/samplers/guidance.py", "ldm/samplers/plms.py",
    "ldm/modules/__init__.py", "ldm/modules/text_encoder.py",
    "server/__init__.py", "server/batching.py", "server/bls.py", "server/limits.py",
    "server/networks.py", "server/txt2img.py",
    "export/__init__.py", "export/ort.py", "export/python_backend.py",
)
# Keys of `options`: those export/repository.py passes, then our own.
EXPORT_OPTIONS: tuple[str, ...] = ("backend", "models", "model_config", "instance_kind",
                                   "instances", "max_batch", "weights")
PIPELINE_OPTIONS: tuple[str, ...] = (
    "pipeline_models",  # which of PIPELINE_MODELS to write (default both)
    "pipeline_instances",  # instances of `ldm_txt2img`, the thin front of the streaming
    # model (default 1; its threads wait on BLS). The streaming model, which holds the
    # networks, always has one instance: the weights are resident once.
    "limits",  # dict of Limits fields overriding the defaults derived from the specs
    "serving",  # dict of ServingOptions fields; `networks` defaults to onnxruntime when the
    # networks are ONNX Runtime Python-backend models (CPU), else to bls
)


def pipeline_info(model, specs: Mapping, onnx: bool = True) -> PipelineInfo:
    """The facts the loop needs, from the LatentDiffusion and the export specs; `onnx`: the
    repository holds each network as `<name>/1/model.onnx` (not TensorRT engines)."""
    from export.triton_config import triton_dims

    targets = {}
    for name in BLS_TARGETS:
        spec = specs[name]
        batched = spec.max_batch_size > 0
        unsqueeze = [t.name for t in spec.inputs if triton_dims(t, batched)[1] is not None]
        targets[name] = {"model": spec.name, "inputs": [t.name for t in spec.inputs],
                         "output": spec.outputs[0].name, "unsqueeze": unsqueeze,
                         "onnx": f"{spec.name}/1/model.onnx" if onnx else None,
                         "max_batch": spec.max_batch_size}
    cfg = model.config
    return PipelineInfo(
        latent_channels=cfg.unet.in_channels,
        downsample_factor=model.first_stage_model.downsample_factor,
        parameterization=model.parameterization,
        max_seq_len=cfg.cond_stage.max_seq_len,
        scale_factor=float(model.scale_factor),
        **targets,
    )


# A UNet this large fills the cores at batch 1-2 on a CPU: the paper's (3.5 GB) took the same
# time per item at batch 2, 4 and 8 (0.95-1.05 s), while its activations grew with the batch
# (+0.4 GB at 2, +0.8 GB at 4, +1.4 GB at 8; the VAE decoder +0.9 GB for 4 images at 256 px).
LARGE_UNET_BYTES = 1 << 30


def large_model_caps(model) -> dict[str, int]:
    """Serving defaults that bound activation memory for a large model on the CPU: UNet runs
    of at most 4 items (two guided requests), VAE decodes one image at a time."""
    unet_bytes = sum(p.numel() * 4 for p in model.model.parameters())
    return {"unet_max_batch": 4, "vae_max_batch": 1} if unet_bytes > LARGE_UNET_BYTES else {}


def supported_sizes(model, specs: Mapping) -> list[int]:
    """Image sizes (pixels, per side) the exported UNet covers; the trained size first."""
    lo, opt, hi = specs["unet"].profile["height"]
    step = 2 ** (len(model.config.unet.channel_mult) - 1)  # the UNet halves h this often
    f = model.first_stage_model.downsample_factor
    sizes = [s * f for s in range(lo, hi + 1) if s % step == 0]
    return sorted(sizes, key=lambda s: (s != opt * f, s))


def max_images(specs: Mapping) -> int:
    """Images per request the graphs can take: guided UNet calls carry twice as many."""
    return min(specs["vae_decoder"].profile["batch"][2], specs["unet"].profile["batch"][2] // 2)


def default_limits(model, specs: Mapping, overrides: Mapping | None = None) -> Limits:
    """Limits derived from the specs, with `overrides` (Limits fields) checked against them."""
    sizes = supported_sizes(model, specs)
    cap = max_images(specs)
    kwargs = {"sizes": tuple(sizes), "max_images": min(4, cap),
              "max_steps": min(100, int(model.num_timesteps))}
    overrides = dict(overrides or {})
    unknown = sorted(set(overrides) - set(Limits.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown limit(s) {unknown}; allowed: "
                         f"{sorted(Limits.__dataclass_fields__)}")
    if "sizes" in overrides:
        overrides["sizes"] = tuple(int(s) for s in overrides["sizes"])
        bad = [s for s in overrides["sizes"] if s not in sizes]
        if bad:
            raise ValueError(f"sizes {bad} are not covered by the exported UNet; allowed: {sizes}")
    if overrides.get("max_images", 1) > cap:
        raise ValueError(f"max_images {overrides['max_images']} exceeds what the exported "
                         f"graphs take ({cap}; export with a larger max_batch)")
    if overrides.get("max_steps", 1) > model.num_timesteps:
        raise ValueError(f"max_steps {overrides['max_steps']} exceeds the model's "
                         f"{model.num_timesteps} timesteps")
    if "samplers" in overrides:
        overrides["samplers"] = tuple(overrides["samplers"])
    merged = {**kwargs, **overrides}
    if "default_steps" not in overrides:  # keep the default inside a lowered max_steps
        merged["default_steps"] = min(Limits.default_steps, merged["max_steps"])
    return Limits(**merged)


# --- config.pbtxt --------------------------------------------------------------------------

def _io_block(name: str, dtype: str, dims: list[int], optional: bool = False) -> str:
    opt = "\n    optional: true" if optional else ""
    return (f'  {{\n    name: "{name}"\n    data_type: {dtype}\n'
            f"    dims: [ {', '.join(map(str, dims))} ]{opt}\n  }}")


def pipeline_config(name: str, limits: Limits, serving: ServingOptions, *, streaming: bool,
                    instances: int = 1) -> str:
    """config.pbtxt of a pipeline model: one request = one prompt (max_batch_size 0)."""
    inputs = [_io_block(n, dtype, [1], optional=n not in REQUIRED_INPUTS)
              for n, (dtype, _) in INPUTS.items()]
    outputs = [_io_block("images", "TYPE_UINT8", [-1, -1, -1, 3]),
               _io_block("warnings", "TYPE_STRING", [-1]),
               _io_block("used_seed", "TYPE_INT64", [1])]
    if streaming:
        outputs += [_io_block("step", "TYPE_INT32", [1]),
                    _io_block("total", "TYPE_INT32", [1]),
                    _io_block("preview", "TYPE_UINT8", [-1, -1, -1, 3])]
    params = {**limits.to_parameters(), **serving.to_parameters()}
    parts = [
        "# Written by server/repository.py; the parameters are the request limits and may be\n"
        "# edited (a bad value stops the model from loading, with a message saying why).",
        f'name: "{name}"', 'backend: "python"', "max_batch_size: 0",
        "input [\n" + ",\n".join(inputs) + "\n]",
        "output [\n" + ",\n".join(outputs) + "\n]",
    ]
    if streaming:
        parts.append("model_transaction_policy {\n  decoupled: true\n}")
    parts.append(f"instance_group [\n  {{ count: {instances} kind: KIND_CPU }}\n]")
    parts.append("parameters [\n" + ",\n".join(
        f'  {{ key: "{k}" value: {{ string_value: "{v}" }} }}' for k, v in params.items())
        + "\n]")
    return "\n".join(parts) + "\n"


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
    pipeline = tuple(m for m in PIPELINE_MODELS if m in every)
    if components or not pipeline:
        return every
    _, serving, _ = read_pipeline_config(repo / pipeline[-1])
    return every if serving.networks == "bls" else pipeline


# --- files ---------------------------------------------------------------------------------

def save_tokenizer(model, folder: Path) -> None:
    """The text encoder's BERT tokenizer, loadable offline with `BERTTokenizer(folder)`.

    transformers 5 `save_pretrained` writes tokenizer.json but no vocab.txt, which
    `BERTTokenizer` requires (see its pitfall note): vocab.txt is written from the vocabulary,
    one token per line in id order.
    """
    tokenizer = model.cond_stage_model.tknz_fn.tokenizer
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(folder))
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    if [vocab[t] for t in tokens] != list(range(len(tokens))):
        raise ValueError("tokenizer vocabulary ids are not 0..V-1: cannot write vocab.txt")
    (folder / "vocab.txt").write_text("".join(f"{t}\n" for t in tokens), encoding="utf-8")


def _check_options(options: Mapping) -> None:
    unknown = sorted(set(options) - set(EXPORT_OPTIONS) - set(PIPELINE_OPTIONS))
    if unknown:
        raise ValueError(f"unknown pipeline option(s) {unknown}; allowed: "
                         f"{sorted(EXPORT_OPTIONS + PIPELINE_OPTIONS)}")


def write_pipeline_models(repo_dir: Path, model, specs: Mapping, options: Mapping) -> list[str]:
    """Write the pipeline models into `repo_dir`; the names written ([] when skipped).

    `model` is the LatentDiffusion that was exported, `specs` export/specs.py's dict, and
    `options` the keys in EXPORT_OPTIONS and PIPELINE_OPTIONS. Skipped (with a warning) when
    the repository lacks one of the models the pipeline calls.
    """
    _check_options(options)
    repo_dir = Path(repo_dir)
    exported = options.get("models", BLS_TARGETS)
    missing = [m for m in BLS_TARGETS if m not in exported or m not in specs]
    if missing:
        log.warning("pipeline models not written: the repository lacks %s", missing)
        return []
    if not getattr(model.cond_stage_model, "use_tknz_fn", False):
        raise ValueError("the pipeline needs a text encoder with a tokenizer (BERTEmbedder "
                         "with use_tokenizer=true)")
    names = tuple(options.get("pipeline_models", PIPELINE_MODELS))
    bad = [n for n in names if n not in PIPELINE_MODELS]
    if bad:
        raise ValueError(f"unknown pipeline model(s) {bad}; allowed: {list(PIPELINE_MODELS)}")
    if "ldm_txt2img_stream" not in names:
        raise ValueError("ldm_txt2img passes its requests to ldm_txt2img_stream (the model "
                         "that holds the networks): write both")
    backend = options.get("backend", "python")
    info = pipeline_info(model, specs, onnx=backend != "tensorrt")
    limits = default_limits(model, specs, options.get("limits"))
    serving = ServingOptions(**{"networks": "onnxruntime" if backend == "python" else "bls",
                                **large_model_caps(model),
                                **dict(options.get("serving", {}))})
    if serving.networks == "onnxruntime" and backend == "tensorrt":
        raise ValueError("networks=onnxruntime needs ONNX files; a TensorRT repository has "
                         "engines only: use networks=bls")
    instances = int(options.get("pipeline_instances", 1))
    if instances < 1:
        raise ValueError(f"pipeline_instances must be >= 1, got {instances}")
    alphas = model.alphas_cumprod.detach().cpu().numpy().astype(np.float32)

    for name in names:
        folder = repo_dir / name
        version = folder / "1"
        version.mkdir(parents=True, exist_ok=True)
        shutil.copy2(TEMPLATES / name / "model.py", version / "model.py")
        for rel in PIPELINE_SOURCES:
            dst = version / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(PROJECT_ROOT / rel, dst)
        save_tokenizer(model, version / TOKENIZER_DIR)
        np.save(version / ALPHAS_FILE, alphas)
        info.save(version)
        streaming = STREAMING[name]
        (folder / "config.pbtxt").write_text(pipeline_config(
            name, limits, serving, streaming=streaming, instances=1 if streaming else instances))
    log.info("wrote pipeline models %s (sizes %s, up to %d images, %d steps)",
             list(names), list(limits.sizes), limits.max_images, limits.max_steps)
    return list(names)


__all__ = ["PIPELINE_MODELS", "PIPELINE_SOURCES", "default_limits",
           "pipeline_config", "pipeline_info", "read_pipeline_config", "save_tokenizer",
           "served_models", "supported_sizes", "write_pipeline_models"]
