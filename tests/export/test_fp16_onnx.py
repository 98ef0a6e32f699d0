"""fp16 ONNX graphs for strongly typed TensorRT: types at the edges and in the fp32 islands,
and the values, checked on the CPU with OpenVINO (it runs fp16 graphs; ONNX Runtime's CPU
provider lacks fp16 kernels for most of them)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto

from export.fp16_onnx import FP32_OPS, PHASE_OPS, phase_nodes, write_fp16_onnx

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16


@pytest.fixture(scope="module")
def fp16_graphs(tiny_onnx, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp16")
    return {name: write_fp16_onnx(tiny_onnx[name], root / name)
            for name in ("text_encoder", "unet", "vae_decoder")}


def types_of(path) -> dict[str, int]:
    """Element type of every tensor of the graph, from ONNX shape inference."""
    model = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    g = model.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.output, *g.value_info]:
        types[v.name] = v.type.tensor_type.elem_type
    return types


@pytest.mark.parametrize("name", ["text_encoder", "unet", "vae_decoder"])
def test_io_stays_fp32_and_weights_become_fp16(fp16_graphs, tiny_onnx, name):
    src = onnx.load(str(tiny_onnx[name]))
    out = onnx.load(str(fp16_graphs[name]))
    edge = lambda g: [(v.name, v.type.tensor_type.elem_type) for v in [*g.input, *g.output]]  # noqa: E731
    assert edge(out.graph) == edge(src.graph)  # the spec's dtypes: served tensors unchanged
    big = [t for t in out.graph.initializer if np.prod(t.dims) >= 1024]
    assert big and all(t.data_type == HALF for t in big)  # conv and matmul weights


def test_fragile_ops_and_the_timestep_embedding_compute_in_fp32(fp16_graphs):
    path = fp16_graphs["unet"]
    graph, types = onnx.load(str(path)).graph, types_of(path)
    fragile = [n for n in graph.node if n.op_type in FP32_OPS]
    assert {n.op_type for n in fragile} >= {"Softmax", "LayerNormalization",
                                            "InstanceNormalization", "Sin", "Cos"}
    for node in fragile:
        floats = [types[x] for x in [*node.input, *node.output] if types.get(x) in (FLOAT, HALF)]
        assert floats and set(floats) == {FLOAT}, (node.name, node.op_type)
    # t * omega before sin/cos: every node they depend on stays fp32.
    blocked = set(phase_nodes(graph))
    assert any(n.op_type == "Mul" for n in graph.node if n.name in blocked)
    phase_mul = [n for n in graph.node if n.name in blocked and n.op_type == "Mul"]
    assert all(types[o] == FLOAT for n in phase_mul for o in n.output)
    # ... while the convolutions and the attention matmuls run in fp16.
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(types[n.output[0]] == HALF for n in convs)
    assert {n.op_type for n in graph.node if n.name in blocked} & set(PHASE_OPS) == set()


@pytest.mark.parametrize("name, tol", [("text_encoder", 1e-2), ("unet", 1e-2),
                                       ("vae_decoder", 1e-2)])
def test_values_match_the_fp32_graph(fp16_graphs, tiny_onnx, tiny_specs, name, tol):
    import openvino as ov

    from export.ort import make_session

    spec = tiny_specs[name]
    feeds = {k: v.numpy() for k, v in spec.sample_inputs(2).items()}
    want = make_session(tiny_onnx[name], 1).run(None, feeds)[0]
    compiled = ov.Core().compile_model(str(fp16_graphs[name]), "CPU",
                                       {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled(feeds)[0]
    assert got.dtype == np.float32 and np.isfinite(got).all()
    rel = np.abs(got - want).max() / np.abs(want).max()
    assert 0 < rel < tol, rel  # fp16 weights: close, and not the same file


def test_large_graphs_keep_their_weights_outside_the_protobuf(tiny_onnx, tmp_path,
                                                              monkeypatch):
    import export.fp16_onnx as fp16

    monkeypatch.setattr(fp16, "EXTERNAL_DATA_THRESHOLD", 1000)
    path = fp16.write_fp16_onnx(tiny_onnx["unet"], tmp_path)
    assert (tmp_path / "model.onnx.data").stat().st_size > (tmp_path / "model.onnx").stat().st_size
    assert not list(tiny_onnx["unet"].parent.glob(".*inferred"))  # its scratch file is gone
    onnx.checker.check_model(str(path))
