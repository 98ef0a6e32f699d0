"""onnx_function / onnx_networks: the pipeline's in-process ONNX Runtime networks."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from server.contract import NETWORKS, PipelineInfo
from server.networks import onnx_function, onnx_networks


def write_scale_graph(path, inputs: list[str], output: str) -> None:
    """output = 2 * first input (+ 0 * the others, so every input is a real graph input)."""
    vals = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", 3]) for n in inputs]
    two = helper.make_tensor("two", TensorProto.FLOAT, [], [2.0])
    nodes = [helper.make_node("Mul", [inputs[0], "two"], [output if len(inputs) == 1 else "y0"])]
    for k, name in enumerate(inputs[1:], 1):
        last = output if k == len(inputs) - 1 else f"y{k}"
        nodes.append(helper.make_node("Sub", [f"y{k - 1}", name], [f"d{k}"]))
        nodes.append(helper.make_node("Add", [f"d{k}", name], [last]))
    graph = helper.make_graph(nodes, "g", vals,
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, None)],
                              initializer=[two])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_onnx_function_feeds_inputs_in_call_order(tmp_path):
    write_scale_graph(tmp_path / "m.onnx", ["a", "b"], "out")
    fn = onnx_function(tmp_path / "m.onnx", ["b", "a"], "out", threads=1)  # call order b, a
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_allclose(fn(np.ones_like(a), a), 2 * a)


def test_onnx_function_refuses_names_the_graph_lacks(tmp_path):
    write_scale_graph(tmp_path / "m.onnx", ["latent"], "out")
    with pytest.raises(ValueError, match=r"graph inputs \['latent'\], pipeline.json says"):
        onnx_function(tmp_path / "m.onnx", ["x"], "out")


def test_onnx_networks_opens_the_graphs_pipeline_json_names(tmp_path):
    info = PipelineInfo(latent_channels=4, downsample_factor=4, parameterization="eps",
                        max_seq_len=77, scale_factor=1.0)
    info = info.model_copy(update={name: info.target(name).model_copy(
        update={"onnx": f"{name}/1/model.onnx"}) for name in NETWORKS})
    for name in NETWORKS:
        target = info.target(name)
        (tmp_path / name / "1").mkdir(parents=True)
        write_scale_graph(tmp_path / target.onnx, target.inputs, target.output)
    fns = onnx_networks(tmp_path, info, threads=1)
    x = np.ones((1, 3), np.float32)
    assert sorted(fns) == ["text_encoder", "unet", "vae_decoder"]
    np.testing.assert_allclose(fns["unet"](x, x, x), 2 * x)


def test_onnx_networks_without_onnx_files_says_use_bls(tmp_path):
    info = PipelineInfo(latent_channels=4, downsample_factor=4, parameterization="eps",
                        max_seq_len=77, scale_factor=1.0)  # "onnx": None, as for TensorRT
    with pytest.raises(ValueError, match="use networks=bls"):
        onnx_networks(tmp_path, info)
