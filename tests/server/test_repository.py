"""write_pipeline_models: the files it writes, checked with Triton's own config schema."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.specs import ShapeLimits, build_specs
from ldm.modules.text_encoder import BERTTokenizer
from server.limits import INPUTS, Limits
from server.repository import (
    PIPELINE_SOURCES,
    PROJECT_ROOT,
    default_limits,
    read_pipeline_config,
    supported_sizes,
    write_pipeline_models,
)
from server.txt2img import PipelineInfo, ServingOptions
from tests.conftest import make_tiny_ldm

# What export/repository.py passes (its _write_pipeline).
EXPORT_OPTIONS = {"backend": "python", "models": ["text_encoder", "unet", "vae_decoder"],
                  "model_config": "model_config.yaml", "instance_kind": "KIND_CPU",
                  "instances": 1, "max_batch": 3, "weights": "ema"}


@pytest.fixture(scope="module")
def model():
    return make_tiny_ldm()


@pytest.fixture(scope="module")
def specs(model):
    # Latents 2..8 (the UNet halves once: even sizes), trained size 4; VAE factor 4.
    return build_specs(model.config, ShapeLimits(max_batch=3, min_latent=2, max_latent=8))


@pytest.fixture(scope="module")
def repo(model, specs, tmp_path_factory):
    out = tmp_path_factory.mktemp("repo")
    written = write_pipeline_models(out, model, specs, {
        **EXPORT_OPTIONS, "pipeline_instances": 3,
        "limits": {"max_steps": 30, "sizes": [16, 32]},
        "serving": {"preview_every": 2}})
    assert written == ["ldm_txt2img", "ldm_txt2img_stream"]
    return out


def read_config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_sizes_and_image_count_follow_the_specs(model, specs):
    assert supported_sizes(model, specs) == [16, 8, 24, 32]  # trained size first
    limits = default_limits(model, specs)
    assert limits.sizes == (16, 8, 24, 32) and limits.default_size == 16
    assert limits.max_images == 3  # vae batch 3, guided unet batch 6 / 2


def test_lowered_max_steps_lowers_the_default(model, specs):
    limits = default_limits(model, specs, {"max_steps": 10})
    assert (limits.max_steps, limits.default_steps) == (10, 10)
    with pytest.raises(ValueError, match="exceeds the model's 1000 timesteps"):
        default_limits(model, specs, {"max_steps": 1001})


def test_configs_parse_with_tritons_schema(repo):
    for name, decoupled in [("ldm_txt2img", False), ("ldm_txt2img_stream", True)]:
        cfg = read_config(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.backend == "python" and cfg.max_batch_size == 0
        assert cfg.model_transaction_policy.decoupled is decoupled
        inputs = {i.name: i for i in cfg.input}
        assert list(inputs) == list(INPUTS)
        assert inputs["prompt"].data_type == model_config_pb2.TYPE_STRING
        assert not inputs["prompt"].optional
        assert all(inputs[n].optional for n in INPUTS if n != "prompt")
        assert inputs["seed"].data_type == model_config_pb2.TYPE_INT64
        assert inputs["guidance_scale"].data_type == model_config_pb2.TYPE_FP32
        outputs = {o.name: o for o in cfg.output}
        assert list(outputs["images"].dims) == [-1, -1, -1, 3]
        assert outputs["images"].data_type == model_config_pb2.TYPE_UINT8
        assert {"warnings", "used_seed"} <= set(outputs)
        assert ({"step", "total", "preview"} <= set(outputs)) is decoupled
        params = {k: v.string_value for k, v in cfg.parameters.items()}
        limits = Limits.from_parameters(params)
        assert limits.max_steps == 30 and limits.sizes == (16, 32) and limits.max_images == 3
        serving = ServingOptions.from_parameters(params)
        assert serving.preview_every == 2 and serving.networks == "onnxruntime"
        # Non-streaming: concurrent requests need instances; streaming: threads.
        assert cfg.instance_group[0].count == (1 if decoupled else 3)


@pytest.mark.parametrize("backend, networks", [("python", "onnxruntime"), ("onnxruntime", "bls"),
                                               ("tensorrt", "bls")])
def test_networks_follow_the_backend(model, specs, tmp_path, backend, networks):
    # ONNX Runtime Python-backend models (CPU): the pipeline opens their graphs itself.
    # Triton's own backends (TensorRT engines, onnxruntime_onnx on a GPU): BLS calls.
    write_pipeline_models(tmp_path, model, specs, {**EXPORT_OPTIONS, "backend": backend})
    params = {k: v.string_value for k, v in
              read_config(tmp_path / "ldm_txt2img" / "config.pbtxt").parameters.items()}
    assert ServingOptions.from_parameters(params).networks == networks
    info = PipelineInfo.load(tmp_path / "ldm_txt2img" / "1")
    assert (info.unet["onnx"] is None) is (backend == "tensorrt")


def test_served_models_leave_out_networks_the_pipeline_runs_itself(model, specs, tmp_path):
    from server.repository import served_models

    for name in ("text_encoder", "unet", "vae_decoder"):  # stand-ins for exported networks
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.pbtxt").write_text(f'name: "{name}"\n')
    write_pipeline_models(tmp_path, model, specs, EXPORT_OPTIONS)  # networks: onnxruntime
    assert served_models(tmp_path) == ("ldm_txt2img", "ldm_txt2img_stream")
    assert set(served_models(tmp_path, components=True)) == {
        "ldm_txt2img", "ldm_txt2img_stream", "text_encoder", "unet", "vae_decoder"}
    write_pipeline_models(tmp_path, model, specs, {**EXPORT_OPTIONS,
                                                   "serving": {"networks": "bls"}})
    assert "unet" in served_models(tmp_path)  # BLS calls them: they must be loaded


def test_large_models_get_batch_caps(model):
    # The paper's 1.45 B model, built without weights (meta): UNet and VAE runs are capped.
    import yaml

    from ldm.checkpoints import empty_weights
    from ldm.compat import ldm_config
    from ldm.models.diffusion import LatentDiffusion
    from server.repository import large_model_caps

    config = Path(__file__).parents[2] / "configs" / "compvis" / "txt2img-1p4B-eval.yaml"
    with empty_weights():
        big = LatentDiffusion(ldm_config(yaml.safe_load(config.read_text())["model"]))
    assert sum(p.numel() for p in big.parameters()) > 1.5e9
    assert large_model_caps(big) == {"unet_max_batch": 4, "vae_max_batch": 1}
    assert large_model_caps(model) == {}  # the tiny one: batching pays, no caps
    assert ServingOptions(**large_model_caps(big)).unet_max_batch == 4


def test_the_front_model_needs_the_streaming_model(model, specs, tmp_path):
    # ldm_txt2img holds no networks: it passes requests to ldm_txt2img_stream.
    with pytest.raises(ValueError, match="write both"):
        write_pipeline_models(tmp_path, model, specs, {"pipeline_models": ["ldm_txt2img"]})


def test_onnxruntime_networks_need_onnx_files(model, specs, tmp_path):
    with pytest.raises(ValueError, match="TensorRT repository has engines only: use networks=bls"):
        write_pipeline_models(tmp_path, model, specs, {
            **EXPORT_OPTIONS, "backend": "tensorrt", "serving": {"networks": "onnxruntime"}})
    with pytest.raises(ValueError, match="networks 'gpu'; allowed"):
        ServingOptions(networks="gpu")


def test_read_pipeline_config_gives_back_what_was_written(repo):
    limits, serving, instances = read_pipeline_config(repo / "ldm_txt2img")
    assert limits.sizes == (16, 32) and limits.max_steps == 30
    assert serving.preview_every == 2 and serving.networks == "onnxruntime"
    assert instances == 3
    assert read_pipeline_config(repo / "ldm_txt2img_stream")[2] == 1


def test_pipeline_facts(repo, model):
    version = repo / "ldm_txt2img" / "1"
    info = PipelineInfo.load(version)
    assert (info.latent_channels, info.downsample_factor, info.parameterization,
            info.max_seq_len, info.scale_factor) == (4, 4, "eps", 77, 0.5)
    # The UNet's (B,) timestep is declared dims [1] + reshape in the batched unet config.
    assert info.unet == {"model": "unet", "inputs": ["latent", "timestep", "context"],
                         "output": "noise_pred", "unsqueeze": ["timestep"],
                         "onnx": "unet/1/model.onnx", "max_batch": 6}
    assert info.text_encoder["unsqueeze"] == [] and info.vae_decoder["output"] == "image"
    alphas = np.load(version / "alphas_cumprod.npy")
    assert alphas.dtype == np.float32
    np.testing.assert_array_equal(alphas, model.alphas_cumprod.numpy())


def test_tokenizer_is_saved_with_identical_ids(repo, model):
    saved = BERTTokenizer(repo / "ldm_txt2img_stream" / "1" / "tokenizer")
    texts = ["a red circle in the top left", "Héllo, wörld!! unaffable", "word " * 90, ""]
    ids, cut = saved.tokenize(texts)
    want_ids, want_cut = model.cond_stage_model.tknz_fn.tokenize(texts)
    assert ids.tolist() == want_ids.tolist() and cut == want_cut == [False, False, True, False]
    assert ids[0, :3].tolist() == [101, 1037, 2417]  # [CLS] a red: bert-base-uncased ids


def test_model_folders_are_self_contained(repo):
    version = repo / "ldm_txt2img" / "1"
    for rel in PIPELINE_SOURCES:
        assert (version / rel).read_bytes() == (PROJECT_ROOT / rel).read_bytes(), rel
    assert (version / "model.py").read_bytes() == (
        PROJECT_ROOT / "server" / "triton_models" / "ldm_txt2img" / "model.py").read_bytes()
    # The copied modules import without this project on the path.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import ldm.pipeline, server.txt2img, "
            "ldm.modules.text_encoder; assert server.txt2img.__file__.startswith(sys.argv[1])")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code, str(version)], cwd=repo, env=env, check=True)


def test_rejects_bad_options(model, specs, tmp_path):
    with pytest.raises(ValueError, match=r"unknown pipeline option\(s\) \['colour'\]"):
        write_pipeline_models(tmp_path, model, specs, {"colour": "red"})
    with pytest.raises(ValueError, match=r"sizes \[20\] are not covered"):
        write_pipeline_models(tmp_path, model, specs, {"limits": {"sizes": [16, 20]}})
    with pytest.raises(ValueError, match="max_images 4 exceeds"):
        write_pipeline_models(tmp_path, model, specs, {"limits": {"max_images": 4}})
    with pytest.raises(ValueError, match=r"unknown limit\(s\) \['max_step'\]"):
        write_pipeline_models(tmp_path, model, specs, {"limits": {"max_step": 4}})
    with pytest.raises(ValueError, match="unknown pipeline model"):
        write_pipeline_models(tmp_path, model, specs, {"pipeline_models": ["txt2img"]})
    assert not any(tmp_path.iterdir())


def test_skipped_without_the_models_it_calls(model, specs, tmp_path):
    assert write_pipeline_models(tmp_path, model, specs,
                                 {**EXPORT_OPTIONS, "models": ["unet", "vae_decoder"]}) == []
    assert not any(tmp_path.iterdir())

