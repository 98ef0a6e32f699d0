"""TensorRT build logic that runs without a GPU: profiles, builder settings, cache keys.

The engine build itself runs only where `tensorrt` and a CUDA GPU exist (marker `gpu`).
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from export.specs import GRAPHS, ShapeLimits, build_specs
from export.tensorrt import (
    EngineSettings,
    builder_plan,
    engine_key,
    engine_path,
    needs_fp16_onnx,
    profile_shapes,
    timing_cache_path,
    trt_status,
)


@pytest.fixture
def specs(tiny_model):
    # tiny model: 4 latent channels, 77 tokens x 32, f=4 autoencoder
    return build_specs(tiny_model.config, ShapeLimits(max_batch=3, min_latent=4, max_latent=8))


def test_unet_profile_doubles_the_batch_for_guidance(specs):
    assert profile_shapes(specs["unet"]) == {
        "latent": ((1, 4, 4, 4), (2, 4, 4, 4), (6, 4, 8, 8)),
        "timestep": ((1,), (2,), (6,)),
        "context": ((1, 77, 32), (2, 77, 32), (6, 77, 32)),
    }


def test_text_and_vae_profiles(specs):
    assert profile_shapes(specs["text_encoder"]) == {
        "input_ids": ((1, 77), (1, 77), (3, 77))}
    assert profile_shapes(specs["vae_decoder"]) == {
        "latent": ((1, 4, 4, 4), (1, 4, 4, 4), (3, 4, 8, 8))}
    assert profile_shapes(specs["vae_encoder"]) == {
        "image": ((1, 3, 16, 16), (1, 3, 16, 16), (3, 3, 32, 32))}


def test_builder_plan(specs):
    plan = builder_plan(specs["unet"], EngineSettings(workspace_gib=0.5))
    assert plan == {
        "flags": ["FP16", "PREFER_PRECISION_CONSTRAINTS"],
        "fp32_layers": ["SOFTMAX", "NORMALIZATION", "REDUCE", "UNARY"],
        "network_flags": [], "onnx": "fp32",
        "workspace_bytes": 512 * 2**20, "optimization_level": 3,
        "profile": {"latent": [[1, 4, 4, 4], [2, 4, 4, 4], [6, 4, 8, 8]],
                    "timestep": [[1], [2], [6]],
                    "context": [[1, 77, 32], [2, 77, 32], [6, 77, 32]]},
    }
    assert builder_plan(specs["unet"], EngineSettings(fp16=False))["flags"] == []
    # Per network: the VAE's GroupNorms overflow in fp16, so its engines stay fp32.
    flags = {name: builder_plan(spec, EngineSettings())["flags"] for name, spec in specs.items()}
    fp16 = ["FP16", "PREFER_PRECISION_CONSTRAINTS"]
    assert flags == {"text_encoder": fp16, "unet": fp16, "vae_decoder": [], "vae_encoder": []}
    # TensorRT 11 has no FP16 flag: strongly typed networks, fp16 ones from the fp16 graph.
    typed = {name: builder_plan(spec, EngineSettings(), "11.0.1")
             for name, spec in specs.items()}
    assert {name: (p["flags"], p["network_flags"], p["onnx"]) for name, p in typed.items()} == {
        "text_encoder": ([], ["STRONGLY_TYPED"], "fp16"),
        "unet": ([], ["STRONGLY_TYPED"], "fp16"),
        "vae_decoder": ([], ["STRONGLY_TYPED"], "fp32"),
        "vae_encoder": ([], ["STRONGLY_TYPED"], "fp32")}
    assert needs_fp16_onnx(specs["unet"], EngineSettings(), "11.0.1")
    assert not needs_fp16_onnx(specs["unet"], EngineSettings(fp16=False), "11.0.1")
    assert not needs_fp16_onnx(specs["unet"], EngineSettings(), "10.13.0")
    assert builder_plan(specs["unet"], EngineSettings(), "10.13.0")["flags"] == fp16
    assert typed["unet"]["fp32_layers"] == []  # the fp16 file says it all
    with pytest.raises(ValueError, match=r"TensorRT 7.2.3 is too old"):
        builder_plan(specs["unet"], EngineSettings(), "7.2.3")
    with pytest.raises(ValueError, match="optimization_level"):
        builder_plan(specs["unet"], EngineSettings(optimization_level=6))
    with pytest.raises(ValueError, match="workspace_gib"):
        builder_plan(specs["unet"], EngineSettings(workspace_gib=0))


def test_engine_key_changes_with_each_input(specs, tiny_model):
    spec, s = specs["unet"], EngineSettings()
    base = engine_key("a" * 64, "10.3.0", "NVIDIA H100", spec, s)
    assert base == engine_key("a" * 64, "10.3.0", "NVIDIA H100", spec, s)  # deterministic
    assert len(base) == 64 and int(base, 16) >= 0
    other_spec = build_specs(tiny_model.config, ShapeLimits(max_batch=4))["unet"]
    variants = [
        engine_key("b" * 64, "10.3.0", "NVIDIA H100", spec, s),  # ONNX changed
        engine_key("a" * 64, "10.4.0", "NVIDIA H100", spec, s),  # TensorRT upgraded
        engine_key("a" * 64, "10.3.0", "NVIDIA L4", spec, s),  # other GPU
        engine_key("a" * 64, "10.3.0", "NVIDIA H100", spec, EngineSettings(fp16=False)),
        engine_key("a" * 64, "10.3.0", "NVIDIA H100", other_spec, s),  # other profile
    ]
    assert len({base, *variants}) == 6


def test_engine_and_timing_cache_paths(tmp_path):
    assert engine_path(tmp_path, "unet", "0123456789abcdef" * 4) == \
        tmp_path / "unet-0123456789abcdef.plan"
    assert timing_cache_path(tmp_path, "10.3.0", "NVIDIA H100 80GB HBM3") == \
        tmp_path / "timing-trt10.3.0-NVIDIA_H100_80GB_HBM3.cache"


def test_trt_status_says_why_not():
    ok, why = trt_status()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    assert ok == (has_trt and torch.cuda.is_available())
    if not has_trt:
        assert (ok, why) == (False, "no `tensorrt` package")


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder", "vae_encoder"])
def test_every_engine_builds_and_matches_onnxruntime(tiny_model, specs, tmp_path, name):
    # pragma: no cover - GPU only
    if not trt_status()[0]:
        pytest.skip(trt_status()[1])
    from export.engine_parity import ENGINE_TOLERANCES, check_engine_parity, engine_runner
    from export.onnx_export import export_onnx
    from export.tensorrt import build_engine

    spec = specs[name]
    onnx_path = export_onnx(GRAPHS[name](tiny_model), spec, tmp_path / name / "model.onnx")
    plan = build_engine(onnx_path, spec, tmp_path / "engines")
    assert build_engine(onnx_path, spec, tmp_path / "engines") == plan  # cached
    report = check_engine_parity(plan, onnx_path, spec)  # min, opt, max shapes; NaN fails
    assert report.max_rel <= ENGINE_TOLERANCES[spec.engine_precision]
    # The runner against PyTorch too, at the largest shapes.
    inputs = spec.sample_inputs(which=2, generator=torch.Generator().manual_seed(0))
    got = engine_runner(plan, spec)({k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        want = GRAPHS[name](tiny_model)(*inputs.values())
    want = want if isinstance(want, tuple) else (want,)
    for a, b in zip(got, want, strict=True):
        assert np.abs(a - b.numpy()).max() / np.abs(b.numpy()).max() < 2e-2
