"""config.pbtxt generation, validated by Triton's own protobuf schema (ModelConfig)."""
from __future__ import annotations

import json

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from export.triton_config import BACKENDS, TritonOptions, model_config, triton_dims

FP32, INT64 = mc.DataType.Value("TYPE_FP32"), mc.DataType.Value("TYPE_INT64")
KIND_CPU = mc.ModelInstanceGroup.Kind.Value("KIND_CPU")
KIND_GPU = mc.ModelInstanceGroup.Kind.Value("KIND_GPU")


def parse(text: str) -> mc.ModelConfig:
    return text_format.Parse(text, mc.ModelConfig())


def _tensors(values) -> list[tuple]:
    return [(t.name, t.data_type, list(t.dims),
             list(t.reshape.shape) if t.HasField("reshape") else None) for t in values]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unet_config(tiny_specs, backend):
    cfg = parse(model_config(tiny_specs["unet"], TritonOptions(backend, max_queue_delay_us=500)))
    assert cfg.name == "unet"
    assert (cfg.backend, cfg.platform) == {
        "python": ("python", ""), "onnxruntime": ("", "onnxruntime_onnx"),
        "tensorrt": ("", "tensorrt_plan"), "openvino": ("openvino", "")}[backend]
    assert cfg.max_batch_size == 16  # 2 x max_batch 8: classifier-free guidance pairs
    # The batch axis is implicit; timestep (B,) is declared [1] and reshaped to [].
    assert _tensors(cfg.input) == [
        ("latent", FP32, [4, -1, -1], None),
        ("timestep", INT64, [1], []),
        ("context", FP32, [77, 32], None),
    ]
    assert _tensors(cfg.output) == [("noise_pred", FP32, [4, -1, -1], None)]
    assert cfg.HasField("dynamic_batching")
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 500
    [group] = cfg.instance_group
    assert (group.count, group.kind) == (1, KIND_GPU if backend == "tensorrt" else KIND_CPU)


@pytest.mark.parametrize("name", ["text_encoder", "vae_decoder", "vae_encoder"])
def test_other_models_are_not_dynamically_batched(tiny_specs, name):
    cfg = parse(model_config(tiny_specs[name], TritonOptions("python")))
    assert cfg.max_batch_size == 8
    assert not cfg.HasField("dynamic_batching")
    expected = {
        "text_encoder": ([("input_ids", INT64, [77], None)], [("context", FP32, [77, 32], None)]),
        "vae_decoder": ([("latent", FP32, [4, -1, -1], None)],
                        [("image", FP32, [3, -1, -1], None)]),
        "vae_encoder": ([("image", FP32, [3, -1, -1], None)],
                        [("mean", FP32, [4, -1, -1], None), ("logvar", FP32, [4, -1, -1], None)]),
    }[name]
    assert (_tensors(cfg.input), _tensors(cfg.output)) == expected


def test_thread_parameters_per_backend(tiny_specs):
    spec = tiny_specs["unet"]
    python = parse(model_config(spec, TritonOptions("python", threads=4, instances=2)))
    params = {k: v.string_value for k, v in python.parameters.items()}
    assert params.pop("intra_op_threads") == "4"
    # The spec's ranges travel as JSON, escaped for the text format and parsed back intact.
    assert json.loads(params.pop("limits")) == spec.serving_limits()
    assert params == {}
    assert python.instance_group[0].count == 2
    onnx = parse(model_config(spec, TritonOptions("onnxruntime")))
    assert {k: v.string_value for k, v in onnx.parameters.items()} == {
        "intra_op_thread_count": "0", "inter_op_thread_count": "1", "execution_mode": "0"}
    gpu = parse(model_config(spec, TritonOptions("onnxruntime", device="gpu")))
    assert gpu.instance_group[0].kind == KIND_GPU and not gpu.parameters
    assert not parse(model_config(spec, TritonOptions("tensorrt"))).parameters


def test_triton_dims():
    from export.specs import TensorSpec

    assert triton_dims(TensorSpec("t", "int64", ("batch",)), batched=True) == ([1], [])
    assert triton_dims(TensorSpec("x", "float32", ("batch", 4, "h", "w")), True) == (
        [4, -1, -1], None)
    assert triton_dims(TensorSpec("x", "float32", (2, "h")), batched=False) == ([2, -1], None)
    with pytest.raises(ValueError, match="leading 'batch'"):
        triton_dims(TensorSpec("x", "float32", (2, "h")), batched=True)


def test_bad_options_name_the_value():
    with pytest.raises(ValueError,
                       match=r"'triton'.*\['python', 'onnxruntime', 'tensorrt', 'openvino'\]"):
        TritonOptions("triton")
    with pytest.raises(ValueError, match=r"'tpu'.*\['cpu', 'gpu'\]"):
        TritonOptions("onnxruntime", device="tpu")
    with pytest.raises(ValueError, match="python backend"):
        TritonOptions("python", device="gpu")
    with pytest.raises(ValueError, match="instances"):
        TritonOptions(instances=0)


def test_one_writer_escapes_every_value():
    # Parameter values are free text (a hand-edited limit, a JSON range): quotes, backslashes
    # and newlines must come back from Triton's parser exactly as written.
    from export.triton_config import base_config, config_text, tensor_config

    tricky = 'a "quoted" \\ back\\slash\nnew line ✓'
    cfg = base_config("m", backend="python", parameters={"note": tricky, 'k"ey': "v"})
    cfg.input.append(tensor_config("t", "TYPE_INT64", [1], reshape=[]))
    text = config_text(cfg, "first line\nsecond line")
    assert text.startswith("# first line\n# second line\n")
    back = parse(text)
    assert back.parameters["note"].string_value == tricky
    assert back.parameters['k"ey'].string_value == "v"
    assert back.input[0].HasField("reshape") and list(back.input[0].reshape.shape) == []


def test_gpu_instances_go_on_the_listed_gpus(tiny_specs):
    # A TensorRT plan only runs on the GPU model that built it: the build lists those GPUs.
    cfg = parse(model_config(tiny_specs["unet"], TritonOptions("tensorrt", gpus=(0, 2))))
    assert cfg.instance_group[0].kind == mc.ModelInstanceGroup.KIND_GPU
    assert list(cfg.instance_group[0].gpus) == [0, 2]
    every = parse(model_config(tiny_specs["unet"], TritonOptions("tensorrt")))
    assert list(every.instance_group[0].gpus) == []  # Triton's default: every GPU
    with pytest.raises(ValueError, match=r"gpus \[0\] are for GPU instances"):
        TritonOptions("python", gpus=(0,))


def test_same_model_gpus():
    from export.tensorrt import same_model_gpus

    assert same_model_gpus(["NVIDIA H100", "NVIDIA L4", "NVIDIA H100"]) == (0, 2)
    assert same_model_gpus(["NVIDIA L4"]) == (0,)
    assert same_model_gpus([]) == ()
