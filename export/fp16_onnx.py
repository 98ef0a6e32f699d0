"""fp16 ONNX graphs for strongly typed TensorRT networks (TensorRT 11 has no FP16 flag).

A strongly typed network computes every tensor in the type the ONNX file gives it, so the
precision choices that the weakly typed FP16 flag left to TensorRT are made here, in the file:

- weights and activations fp16, the graph's inputs and outputs fp32 as the spec says
  (Cast nodes at the edges: the served tensors and the Triton configs do not change);
- fp32 for the numerically fragile ops (FP32_OPS): softmax (attention), the normalisations
  (GroupNorm is exported as InstanceNormalization between Reshapes, LayerNorm as
  LayerNormalization), and the reductions and powers of hand-written norms;
- fp32 for the whole sinusoidal timestep embedding, i.e. every node Sin/Cos depend on: t up to
  999 times a frequency in fp16 has a spacing of 0.5 rad, which scrambles the phase.

    write_fp16_onnx(onnx_path, out_dir)  # -> out_dir/model.onnx (+ model.onnx.data)

The conversion itself is ONNX Runtime's `onnxruntime.transformers.float16` (shipped in the
onnxruntime wheels, CPU and GPU), given these block lists. Shapes are inferred on the file
first (`infer_shapes_path` handles >2 GiB models with external data). The result is checked
here on the CPU with OpenVINO, which runs fp16 graphs; the engines are checked against ONNX
Runtime fp32 after every build (export/engine_parity.py).
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

from export.onnx_export import EXTERNAL_DATA_NAME, EXTERNAL_DATA_THRESHOLD

log = logging.getLogger(__name__)

FP32_OPS = ("Softmax", "LayerNormalization", "InstanceNormalization", "GroupNormalization",
            "ReduceMean", "ReduceSum", "Pow", "Sqrt", "Reciprocal", "Exp", "Sin", "Cos",
            "RandomNormalLike")
PHASE_OPS = ("Sin", "Cos")  # their inputs' whole history stays fp32


def phase_nodes(graph: onnx.GraphProto) -> list[str]:
    """Names of every node that Sin/Cos depend on (the timestep embedding's arithmetic)."""
    producer = {out: node for node in graph.node for out in node.output}
    todo = [i for node in graph.node if node.op_type in PHASE_OPS for i in node.input]
    found: dict[str, onnx.NodeProto] = {}
    while todo:
        node = producer.get(todo.pop())
        if node is None or node.name in found:
            continue
        found[node.name] = node
        todo.extend(node.input)
    return sorted(found)


def name_nodes(graph: onnx.GraphProto) -> None:
    """Give unnamed nodes a unique name: the block list refers to nodes by name."""
    taken = {n.name for n in graph.node if n.name}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}"
            while node.name in taken:
                node.name += "_"
            taken.add(node.name)


def convert_fp16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The fp16 graph of `model` (weights loaded), with the fp32 islands of the docstring."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    name_nodes(model.graph)
    model = convert_float_to_float16(
        model, keep_io_types=True, disable_shape_infer=True,
        op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP32_OPS],
        node_block_list=phase_nodes(model.graph))
    sort_nodes(model.graph)
    return model


def sort_nodes(graph: onnx.GraphProto) -> None:
    """Put the nodes in an order where each comes after its inputs' producers, as ONNX (and
    TensorRT's parser, which reads nodes in file order) requires: the converter appends the
    Cast nodes it adds around fp32 islands at the end."""
    ready = {"", *(i.name for i in graph.input), *(t.name for t in graph.initializer)}
    waiting = {}  # node index -> how many of its inputs are not produced yet
    consumers: dict[str, list[int]] = {}
    for k, node in enumerate(graph.node):
        needed = set(node.input) - ready
        waiting[k] = len(needed)
        for name in needed:
            consumers.setdefault(name, []).append(k)
    queue = [k for k, count in waiting.items() if count == 0]
    ordered = []
    while queue:
        node = graph.node[queue.pop()]
        ordered.append(node)
        for out in node.output:
            for k in consumers.pop(out, []):
                waiting[k] -= 1
                if waiting[k] == 0:
                    queue.append(k)
    if len(ordered) != len(graph.node):
        raise ValueError(f"the graph has a cycle or unknown inputs: {sorted(consumers)[:3]}")
    ordered = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(ordered)


def write_fp16_onnx(onnx_path: str | Path, out_dir: str | Path) -> Path:
    """out_dir/model.onnx: the fp16 graph of the fp32 ONNX file at `onnx_path` (weights in
    model.onnx.data beside it when they pass the protobuf-safe threshold)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written beside the source, so that its external data is found relative to the file.
    inferred = Path(onnx_path).with_name(f".{Path(onnx_path).name}.inferred")
    try:
        onnx.shape_inference.infer_shapes_path(str(onnx_path), str(inferred))
        model = convert_fp16(onnx.load(str(inferred)))
    finally:
        inferred.unlink(missing_ok=True)
    path = out_dir / "model.onnx"
    external = sum(len(t.raw_data) for t in model.graph.initializer) > EXTERNAL_DATA_THRESHOLD
    for old in (path, out_dir / EXTERNAL_DATA_NAME):
        old.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=external,
                    location=EXTERNAL_DATA_NAME, all_tensors_to_one_file=True)
    log.info("fp16 graph of %s -> %s", onnx_path, path)
    return path
