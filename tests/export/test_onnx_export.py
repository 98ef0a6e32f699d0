"""ONNX export of the tiny LDM: names, dims, opset, external data, and the parity check."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from export.onnx_export import export_onnx, onnx_digest
from export.parity import ParityError, check_parity, parity_points, relative_error
from export.specs import GRAPHS, ShapeLimits, build_specs

FIXTURES = Path(__file__).parents[1] / "fixtures"
# The tiny fixture (tests/fixtures/tiny_ldm.yaml): 77 tokens x 32 dims, 4x4x4 latents, f=4.
EXPECTED_IO = {
    "text_encoder": ([("input_ids", ["batch", 77])], [("context", ["batch", 77, 32])]),
    "unet": ([("latent", ["batch", 4, "height", "width"]), ("timestep", ["batch"]),
              ("context", ["batch", 77, 32])],
             [("noise_pred", ["batch", 4, "height", "width"])]),
    "vae_decoder": ([("latent", ["batch", 4, "height", "width"])],
                    [("image", ["batch", 3, "image_height", "image_width"])]),
    "vae_encoder": ([("image", ["batch", 3, "image_height", "image_width"])],
                    [("mean", ["batch", 4, "height", "width"]),
                     ("logvar", ["batch", 4, "height", "width"])]),
}
ONNX_TYPES = {"input_ids": 7, "timestep": 7}  # TensorProto.INT64; everything else FLOAT (1)


def _io(values) -> list[tuple[str, list]]:
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values]


@pytest.mark.parametrize("name", list(EXPECTED_IO))
def test_exported_graph_has_spec_names_dims_and_opset(tiny_onnx, name):
    path = tiny_onnx[name]
    onnx.checker.check_model(str(path), full_check=True)
    model = onnx.load(str(path))
    inputs, outputs = EXPECTED_IO[name]
    assert _io(model.graph.input) == inputs
    assert _io(model.graph.output) == outputs
    for v in (*model.graph.input, *model.graph.output):
        assert v.type.tensor_type.elem_type == ONNX_TYPES.get(v.name, 1), v.name
    assert {(o.domain or "ai.onnx"): o.version for o in model.opset_import}["ai.onnx"] == 17
    # Portable standard ops only: no runtime-specific contrib ops that TensorRT would reject.
    assert {n.domain for n in model.graph.node} <= {""}
    assert not (path.parent / "model.onnx.data").exists()


def test_unet_attention_is_exported_as_matmul_softmax(tiny_onnx):
    ops = [n.op_type for n in onnx.load(str(tiny_onnx["unet"])).graph.node]
    # attention_resolutions [1], num_res_blocks 1: SpatialTransformers at input level 0 (1),
    # in the middle block (1) and at output level 0 (num_res_blocks + 1 = 2): 4, each with a
    # self- and a cross-attention.
    assert ops.count("Softmax") == 8
    assert "Attention" not in ops and "MultiHeadAttention" not in ops


def test_opset_below_17_is_refused(tiny_model, tiny_specs, tmp_path):
    with pytest.raises(ValueError, match="opset 16"):
        export_onnx(GRAPHS["unet"](tiny_model), tiny_specs["unet"], tmp_path / "m.onnx", 16)


def test_external_data_export_checks_and_matches_pytorch(tiny_model, tiny_specs, tmp_path):
    """threshold 0 forces the > 2 GiB layout: weights in one model.onnx.data beside it."""
    spec = tiny_specs["vae_decoder"]
    graph = GRAPHS["vae_decoder"](tiny_model)
    path = export_onnx(graph, spec, tmp_path / "model.onnx", external_data_threshold=0)
    data = tmp_path / "model.onnx.data"
    assert data.is_file() and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx", "model.onnx.data"]
    proto = onnx.load(str(path), load_external_data=False)
    external = [t for t in proto.graph.initializer if t.external_data]
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {
        "model.onnx.data"}
    # The decoder's conv weights (all > 1 KiB) live in the data file, not in the protobuf.
    decoder_conv = graph.first_stage_model.decoder.conv_in.weight
    assert decoder_conv.numel() * 4 > 1024
    assert len(external) > 20 and path.stat().st_size < data.stat().st_size / 10
    report = check_parity(graph, path, spec, seed=1)
    assert report.max_rel < 1e-4
    # The digest covers the external weights too.
    before = onnx_digest(path)
    with open(data, "r+b") as f:
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 1]))
    assert onnx_digest(path) != before


# --- parity --------------------------------------------------------------------------------

def test_relative_error_closed_form():
    a, b = np.array([1.0, 2.0, -3.0]), np.array([1.0, 4.0, -3.5])
    assert relative_error(a, b) == pytest.approx((2.0, 2.0 / 4.0))
    assert relative_error(np.array([0.5]), np.zeros(1)) == (0.5, 0.5)
    assert relative_error(np.array([np.nan, 1.0]), np.ones(2)) == (np.inf, np.inf)


def test_parity_points_cover_min_opt_max_and_big_batch_small_image(tiny_model):
    specs = build_specs(tiny_model.config, ShapeLimits(max_batch=4, min_latent=2, max_latent=8))
    assert parity_points(specs["unet"]) == [
        {"batch": 1, "height": 2, "width": 2},
        {"batch": 2, "height": 4, "width": 4},
        {"batch": 8, "height": 8, "width": 8},
        {"batch": 8, "height": 2, "width": 2},
    ]
    assert parity_points(specs["text_encoder"]) == [{"batch": 1}, {"batch": 4}]


@pytest.mark.parametrize("name", list(EXPECTED_IO))
def test_parity_of_every_exported_graph(tiny_model, tiny_specs, tiny_onnx, name):
    report = check_parity(GRAPHS[name](tiny_model), tiny_onnx[name], tiny_specs[name])
    assert report.ok and report.max_rel < 1e-4 and report.max_abs > 0  # fp32, not bitwise
    assert [{k: p[k] for k in tiny_specs[name].profile} for p in report.points] == \
        parity_points(tiny_specs[name])


def test_parity_at_other_resolutions(tiny_model, tmp_path):
    """A graph exported at one latent size runs (and agrees) across the profile's range."""
    # (2x2 latents would leave the middle block 1x1, too small for its GroupNorm.)
    specs = build_specs(tiny_model.config, ShapeLimits(max_batch=2, min_latent=4, max_latent=8))
    graph = GRAPHS["unet"](tiny_model)
    path = export_onnx(graph, specs["unet"], tmp_path / "model.onnx")
    report = check_parity(graph, path, specs["unet"], seed=3)
    assert {(p["height"], p["batch"]) for p in report.points} == {(4, 1), (4, 2), (8, 4), (4, 4)}
    assert report.max_rel < 1e-4


def test_a_wrong_graph_fails_parity(tiny_model, tiny_specs, tiny_onnx, tmp_path):
    """One weight of the UNet changed by 1% -> the check must fail, naming the model."""
    model = onnx.load(str(tiny_onnx["unet"]))
    biggest = max(model.graph.initializer, key=lambda t: np.prod(t.dims))
    w = numpy_helper.to_array(biggest).copy()
    w *= 1.01
    biggest.CopyFrom(numpy_helper.from_array(w, biggest.name))
    bad = tmp_path / "bad.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(ParityError, match=r"unet: .*FAIL"):
        check_parity(GRAPHS["unet"](tiny_model), bad, tiny_specs["unet"])


def test_parity_against_another_models_weights_fails(tiny_specs, tiny_onnx):
    from ldm.config import LDMConfig, load_yaml
    from ldm.models.diffusion import LatentDiffusion

    torch.manual_seed(1)
    other = LatentDiffusion(load_yaml(LDMConfig, FIXTURES / "tiny_ldm.yaml")).eval()
    with pytest.raises(ParityError):
        check_parity(GRAPHS["text_encoder"](other), tiny_onnx["text_encoder"],
                     tiny_specs["text_encoder"])


def test_an_all_zero_reference_is_flagged(tiny_specs, tmp_path, caplog):
    """A freshly built UNet outputs exactly 0 (zero-initialised out conv): parity "passes"
    trivially, so the report says so."""
    from ldm.config import LDMConfig, load_yaml
    from ldm.models.diffusion import LatentDiffusion

    fresh = LatentDiffusion(load_yaml(LDMConfig, FIXTURES / "tiny_ldm.yaml")).eval()
    graph = GRAPHS["unet"](fresh)
    path = export_onnx(graph, tiny_specs["unet"], tmp_path / "model.onnx")
    report = check_parity(graph, path, tiny_specs["unet"], seed=0)
    assert report.all_zero_outputs == ["noise_pred"] and report.max_abs == 0.0
    assert "all zeros" in caplog.text
