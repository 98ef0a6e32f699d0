"""OpenVINO networks: the exported graphs compiled at fp32 and bf16, checked against PyTorch."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from export.openvino import (
    TOLERANCES,
    check_parity,
    native_bf16,
    openvino_function,
    resolve_precision,
)
from export.parity import ParityError, reference_outputs
from export.specs import GRAPHS

needs_bf16 = pytest.mark.skipif(not native_bf16(), reason="this CPU has no native bf16")


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder"])
def test_fp32_graphs_match_pytorch(tiny_model, tiny_specs, tiny_onnx, name):
    references = reference_outputs(GRAPHS[name](tiny_model), tiny_specs[name], seed=0)
    report = check_parity(tiny_onnx[name], tiny_specs[name], references, "fp32")
    assert report.max_rel <= TOLERANCES["fp32"] and report.name.endswith("(openvino fp32)")


@needs_bf16
def test_bf16_is_really_bf16_and_within_its_tolerance(tiny_model, tiny_specs, tiny_onnx):
    spec = tiny_specs["unet"]
    references = reference_outputs(GRAPHS["unet"](tiny_model), spec, seed=0)
    bf16 = check_parity(tiny_onnx["unet"], spec, references, "bf16")
    fp32 = check_parity(tiny_onnx["unet"], spec, references, "fp32")
    # bf16 keeps 8 mantissa bits: its error is orders above fp32's, and within its tolerance.
    assert bf16.max_rel > 100 * fp32.max_rel and bf16.max_rel <= TOLERANCES["bf16"]
    assert resolve_precision("auto") == "bf16"


def test_the_unets_reduced_precision_check_uses_its_text_encoders_contexts(
        tiny_model, tiny_specs, tiny_onnx):
    import torch

    from export.parity import text_contexts

    te_spec = tiny_specs["text_encoder"]
    make = text_contexts(GRAPHS["text_encoder"](tiny_model), te_spec)
    low, high = te_spec.value_ranges["input_ids"]
    ids = torch.randint(low, high, (3, 77), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = GRAPHS["text_encoder"](tiny_model)(ids)
    assert torch.equal(make(3, torch.Generator().manual_seed(5)), want)
    made = []
    references = reference_outputs(GRAPHS["unet"](tiny_model), tiny_specs["unet"], seed=0,
                                   contexts=lambda b, g: made.append(make(b, g)) or made[-1])
    assert len(made) == len(references.cases) > 1
    for (_, inputs, _), context in zip(references.cases, made, strict=True):
        assert inputs["context"] is context
    precision = "bf16" if native_bf16() else "fp32"
    report = check_parity(tiny_onnx["unet"], tiny_specs["unet"], references, precision)
    assert report.max_rel <= TOLERANCES[precision]


def test_nan_fails_parity_at_any_tolerance(tiny_model, tiny_specs, tiny_onnx):
    spec = tiny_specs["vae_decoder"]
    references = reference_outputs(GRAPHS["vae_decoder"](tiny_model), spec, seed=0)
    broken = onnx.load(str(tiny_onnx["vae_decoder"]))
    out = broken.graph.output[0].name
    # image -> sqrt(-1 - image^2): NaN everywhere, same shape and name.
    g = broken.graph
    g.node[-1].output[0] = "pre"
    g.node.extend([helper.make_node("Mul", ["pre", "pre"], ["sq"]),
                   helper.make_node("Neg", ["sq"], ["neg"]),
                   helper.make_node("Sub", ["neg", "one"], ["below"]),
                   helper.make_node("Sqrt", ["below"], [out])])
    g.initializer.append(helper.make_tensor("one", TensorProto.FLOAT, [], [1.0]))
    path = tiny_onnx["vae_decoder"].parent / "nan.onnx"
    onnx.save(broken, str(path))
    with pytest.raises(ParityError, match="max rel inf"):
        check_parity(path, spec, references, "fp32", tol=1e9)


def test_function_calls_in_the_callers_order_and_caches_the_compiled_graph(
        tiny_model, tiny_specs, tiny_onnx, tmp_path):
    spec = tiny_specs["unet"]
    fn = openvino_function(tiny_onnx["unet"], ["context", "timestep", "latent"], "noise_pred",
                           threads=1, cache_dir=tmp_path / "cache")
    inputs = spec.sample_inputs(generator=None)
    got = fn(*(inputs[k].numpy() for k in ("context", "timestep", "latent")))
    want = GRAPHS["unet"](tiny_model)(*inputs.values()).detach().numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert any((tmp_path / "cache").iterdir())  # a restart imports instead of compiling
    with pytest.raises(ValueError, match="graph inputs"):
        openvino_function(tiny_onnx["unet"], ["x"], "noise_pred")


def resident_bytes_under(folder) -> int:
    """Resident bytes of this process's mappings of files under `folder` (/proc/self/smaps)."""
    root, total, inside = str(folder.resolve()) + "/", 0, False
    for line in open("/proc/self/smaps"):
        fields = line.split()
        if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
            inside = len(fields) >= 6 and fields[5].startswith(root)
        elif inside and fields[0] == "Rss:":
            total += int(fields[1]) * 1024
    return total


def test_the_mapped_weights_are_given_back_after_each_new_shape(tiny_specs, tiny_onnx, tmp_path):
    cache = tmp_path / "cache"
    openvino_function(tiny_onnx["unet"], ["context", "timestep", "latent"], "noise_pred",
                      threads=1, cache_dir=cache)  # compiles and writes the blob
    fn = openvino_function(tiny_onnx["unet"], ["context", "timestep", "latent"], "noise_pred",
                           threads=1, cache_dir=cache)  # imports it, mapped
    inputs = tiny_specs["unet"].sample_inputs(generator=None)
    first = fn(*(inputs[k].numpy() for k in ("context", "timestep", "latent")))
    assert resident_bytes_under(cache) == 0
    assert resident_bytes_under(tiny_onnx["unet"].parent) == 0
    again = fn(*(inputs[k].numpy() for k in ("context", "timestep", "latent")))
    np.testing.assert_array_equal(again, first)


def test_precisions_are_checked():
    with pytest.raises(ValueError, match="precision 'fp16'; allowed"):
        resolve_precision("fp16")


def test_openvino_backend_repository(tiny_ldm_dir, tmp_path, capsys):
    """`--backend openvino` writes Triton openvino_backend models over the raw ONNX export,
    each checked on OpenVINO at its precision."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as mc

    from export.build_engines import main

    precision = "bf16" if native_bf16() else "fp32"
    rc = main(["--checkpoint", str(tiny_ldm_dir), "--out", str(tmp_path / "repo"),
               "--work-dir", str(tmp_path / "work"), "--quiet", "--backend", "openvino",
               "--openvino-precision", precision, "--models", "unet,vae_decoder"])
    assert rc == 0, capsys.readouterr().err
    repo = tmp_path / "repo"
    cfg = text_format.Parse((repo / "unet" / "config.pbtxt").read_text(), mc.ModelConfig())
    assert (cfg.backend, cfg.default_model_filename) == ("openvino", "model.onnx")
    params = {k: v.string_value for k, v in cfg.parameters.items()}
    assert params["PERFORMANCE_HINT"] == "LATENCY"
    assert params.get("HINT_BF16") == ("YES" if precision == "bf16" else None)
    assert sorted(p.name for p in (repo / "unet" / "1").iterdir()) == ["model.onnx"]
    manifest = json.loads((repo / "manifest.json").read_text())
    parity = manifest["models"]["unet"]["openvino_parity"][precision]
    assert parity["max_rel"] <= parity["tol"] == TOLERANCES[precision]
