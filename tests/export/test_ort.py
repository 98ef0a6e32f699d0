"""ONNX Runtime helpers: session settings and the portable offline-optimised graph."""
from __future__ import annotations

import os

import onnx
import onnxruntime as ort
import pytest

from export.ort import hardware_specific_ops, make_session, optimize_for_cpu
from export.parity import check_parity
from export.specs import GRAPHS


def _save_all_level(src, dst):
    """Level ALL saved independently of export.ort, to see what it adds on this CPU."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(dst)
    opts.log_severity_level = 3
    ort.InferenceSession(str(src), opts, providers=["CPUExecutionProvider"])
    return {(n.domain, n.op_type) for n in onnx.load(str(dst)).graph.node}


def test_make_session_threads_default_to_usable_cores(tiny_onnx):
    opts = make_session(tiny_onnx["text_encoder"]).get_session_options()
    assert opts.intra_op_num_threads == len(os.sched_getaffinity(0))
    assert opts.inter_op_num_threads == 1
    assert opts.execution_mode == ort.ExecutionMode.ORT_SEQUENTIAL
    assert make_session(tiny_onnx["text_encoder"], threads=3).get_session_options() \
        .intra_op_num_threads == 3


def test_make_session_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        make_session(tmp_path / "nope.onnx")


def test_auto_level_keeps_the_saved_graph_portable(tiny_model, tiny_specs, tiny_onnx, tmp_path):
    src = tiny_onnx["unet"]
    all_ops = _save_all_level(src, tmp_path / "all.onnx")
    nchwc = {op for op in all_ops if op[0] == "com.microsoft.nchwc"}
    level = optimize_for_cpu(src, tmp_path / "auto" / "model.onnx", "auto")
    # ALL adds NCHWc convolutions wherever the CPU has wide vectors (AVX2/AVX-512 here).
    assert level == ("extended" if nchwc else "all")
    saved = onnx.load(str(tmp_path / "auto" / "model.onnx"))
    assert not [n for n in saved.graph.node if n.domain == "com.microsoft.nchwc"]
    assert hardware_specific_ops(tmp_path / "auto" / "model.onnx") == []
    assert hardware_specific_ops(tmp_path / "all.onnx") == sorted(f"{d}:{o}" for d, o in nchwc)
    # EXTENDED fuses (here: GELU and MatMul+scale into com.microsoft ops): it is optimised.
    assert {n.domain for n in saved.graph.node} >= {"com.microsoft"}
    check_parity(GRAPHS["unet"](tiny_model), tmp_path / "auto" / "model.onnx",
                 tiny_specs["unet"], seed=5)


def test_explicit_levels(tiny_onnx, tmp_path):
    assert optimize_for_cpu(tiny_onnx["text_encoder"], tmp_path / "e.onnx", "extended") == \
        "extended"
    assert optimize_for_cpu(tiny_onnx["vae_decoder"], tmp_path / "a.onnx", "all") == "all"
    with pytest.raises(ValueError, match=r"'fast'.*\['auto', 'extended', 'all'\]"):
        optimize_for_cpu(tiny_onnx["text_encoder"], tmp_path / "x.onnx", "fast")
