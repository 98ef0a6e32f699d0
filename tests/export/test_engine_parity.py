"""The engine check's reference side, which runs here: ONNX Runtime's outputs at every parity
point, and the check itself failing on drift and on NaN (the engine side needs a GPU:
tests/export/test_tensorrt.py)."""
from __future__ import annotations

import numpy as np
import pytest

from export.engine_parity import ENGINE_TOLERANCES, onnxruntime_references
from export.parity import ParityError, compare_outputs, parity_points, reference_outputs
from export.specs import GRAPHS


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder"])
def test_onnxruntime_references_cover_every_point_and_equal_pytorch(
        tiny_model, tiny_specs, tiny_onnx, name):
    spec = tiny_specs[name]
    ort_refs = onnxruntime_references(tiny_onnx[name], spec, seed=3)
    torch_refs = reference_outputs(GRAPHS[name](tiny_model), spec, seed=3)
    assert [p for p, _, _ in ort_refs.cases] == parity_points(spec)
    for (_, a_in, a_out), (_, b_in, b_out) in zip(ort_refs.cases, torch_refs.cases, strict=True):
        assert all(np.array_equal(a_in[k].numpy(), b_in[k].numpy()) for k in a_in)
        for a, b in zip(a_out, b_out, strict=True):
            assert np.abs(a.numpy() - b.numpy()).max() <= 1e-4 * np.abs(b.numpy()).max()


def test_the_check_fails_on_drift_and_on_nan(tiny_specs, tiny_onnx):
    spec = tiny_specs["vae_decoder"]
    refs = onnxruntime_references(tiny_onnx["vae_decoder"], spec, seed=1)
    exact = {tuple(i["latent"].shape): o for _, i, o in refs.cases}

    def drifting(inputs, scale=1.0 + 2 * ENGINE_TOLERANCES["fp32"]):
        return [o.numpy() * scale for o in exact[inputs["latent"].shape]]

    assert compare_outputs(lambda x: drifting(x, 1.0), spec, refs, 1e-4).max_rel == 0
    with pytest.raises(ParityError):
        compare_outputs(drifting, spec, refs, ENGINE_TOLERANCES["fp32"])
    with pytest.raises(ParityError):  # a NaN fails at any tolerance
        compare_outputs(lambda x: [np.full_like(o, np.nan) for o in drifting(x, 1.0)],
                        spec, refs, 1e9)


def test_the_unets_references_take_its_text_encoders_contexts(tiny_model, tiny_specs,
                                                              tiny_onnx):
    # What the fp16 engine is checked on (as the bf16 OpenVINO graph is): the same inputs as
    # PyTorch's references, with contexts from the model's own text encoder.
    from export.parity import text_contexts

    spec = tiny_specs["unet"]
    make = text_contexts(GRAPHS["text_encoder"](tiny_model), tiny_specs["text_encoder"])
    ort_refs = onnxruntime_references(tiny_onnx["unet"], spec, seed=4, contexts=make)
    torch_refs = reference_outputs(GRAPHS["unet"](tiny_model), spec, seed=4, contexts=make)
    plain = reference_outputs(GRAPHS["unet"](tiny_model), spec, seed=4)
    for (_, a_in, a_out), (_, b_in, b_out), (_, c_in, _) in zip(
            ort_refs.cases, torch_refs.cases, plain.cases, strict=True):
        assert np.array_equal(a_in["context"].numpy(), b_in["context"].numpy())
        assert not np.array_equal(a_in["context"].numpy(), c_in["context"].numpy())
        assert np.abs(a_out[0].numpy() - b_out[0].numpy()).max() \
            <= 1e-4 * np.abs(b_out[0].numpy()).max()
