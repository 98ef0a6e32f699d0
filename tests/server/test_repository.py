"""server.repository.assemble: the pipeline models it adds to a built repository, checked
with Triton's own config schema. The built repository is made here as export/repository.py
writes it (manifest.json, model_config.yaml, one folder per network), without the ONNX
export: the pipeline step reads only those files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from export.specs import ShapeLimits, build_specs
from export.steps import model_config_dict, spec_summary
from ldm.modules.text_encoder import BERTTokenizer
from server.contract import INPUTS, Limits, PipelineInfo, ServingOptions
from server.pipeline_facts import default_limits, large_model_caps, supported_sizes
from server.repository import PipelineOptions, assemble, read_pipeline_config
from tests.conftest import make_tiny_ldm

NETWORKS = ("text_encoder", "unet", "vae_decoder")


@pytest.fixture(scope="module")
def model():
    return make_tiny_ldm()


@pytest.fixture(scope="module")
def specs(model):
    # Latents 2..8 (the UNet halves once: even sizes), trained size 4; VAE factor 4.
    return build_specs(model.config, ShapeLimits(max_batch=3, min_latent=2, max_latent=8))


def write_built(out: Path, model, specs, backend: str = "python",
                networks=NETWORKS, unet_bytes: int = 1000, prefix: str = "") -> Path:
    """The files export/repository.py leaves in `out` that the pipeline step reads."""
    out.mkdir(parents=True, exist_ok=True)
    for name in networks:
        folder = out / f"{prefix}{name}"
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(f'name: "{prefix}{name}"\n')
        (folder / "1" / "model.onnx").write_bytes(b"\0" * (unet_bytes if name == "unet"
                                                           else 10))
    manifest = {"backend": backend, "model_config": "model_config.yaml",
                "schedule": "alphas_cumprod.npy", "name_prefix": prefix,
                "models": {name: spec_summary(specs[name]) for name in networks}}
    np.save(out / "alphas_cumprod.npy", model.alphas_cumprod.numpy())
    (out / "manifest.json").write_text(json.dumps(manifest))
    (out / "model_config.yaml").write_text(yaml.safe_dump(model_config_dict(model)))
    return out


@pytest.fixture(scope="module")
def repo(model, specs, tmp_path_factory):
    out = write_built(tmp_path_factory.mktemp("repo") / "r", model, specs)
    written = assemble(out, PipelineOptions(instances=3,
                                            limits={"max_steps": 30, "sizes": [16, 32]},
                                            serving={"preview_every": 2}))
    assert written == ["ldm_txt2img", "ldm_txt2img_stream"]
    return out


def networks(specs) -> dict:
    return {name: spec_summary(specs[name]) for name in NETWORKS}


def read_config(path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_sizes_and_image_count_follow_the_specs(model, specs):
    assert supported_sizes(model.config, networks(specs)) == [16, 8, 24, 32]  # trained first
    limits = default_limits(model.config, networks(specs))
    assert limits.sizes == (16, 8, 24, 32) and limits.default_size == 16
    assert limits.max_images == 3  # vae batch 3, guided unet batch 6 / 2


def test_lowered_max_steps_lowers_the_default(model, specs):
    limits = default_limits(model.config, networks(specs), {"max_steps": 10})
    assert (limits.max_steps, limits.default_steps) == (10, 10)
    with pytest.raises(ValueError, match="exceeds the model's 1000 timesteps"):
        default_limits(model.config, networks(specs), {"max_steps": 1001})


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
        assert serving.preview_every == 2 and serving.networks == "openvino"
        # Non-streaming: concurrent requests need instances; streaming: threads.
        assert cfg.instance_group[0].count == (1 if decoupled else 3)


@pytest.mark.parametrize("backend, networks, precision", [
    ("python", "openvino", "auto"), ("onnxruntime", "bls", "fp32"), ("tensorrt", "bls", "fp32")])
def test_networks_follow_the_backend(model, specs, tmp_path, backend, networks, precision):
    # Python-backend models (CPU): the pipeline compiles their graphs itself, with OpenVINO at
    # bf16 where the CPU has it. Triton's own backends (TensorRT engines, onnxruntime_onnx on
    # a GPU): BLS calls.
    assemble(write_built(tmp_path / "r", model, specs, backend))
    tmp_path = tmp_path / "r"
    params = {k: v.string_value for k, v in
              read_config(tmp_path / "ldm_txt2img" / "config.pbtxt").parameters.items()}
    serving = ServingOptions.from_parameters(params)
    assert (serving.networks, serving.precision) == (networks, precision)
    info = PipelineInfo.load(tmp_path / "ldm_txt2img" / "1")
    assert (info.unet.onnx is None) is (backend == "tensorrt")


def test_served_models_leave_out_networks_the_pipeline_runs_itself(model, specs, tmp_path):
    from server.repository import served_models

    tmp_path = write_built(tmp_path / "r", model, specs)
    assemble(tmp_path)  # networks: openvino
    assert served_models(tmp_path) == ("ldm_txt2img", "ldm_txt2img_stream")
    assert set(served_models(tmp_path, components=True)) == {
        "ldm_txt2img", "ldm_txt2img_stream", "text_encoder", "unet", "vae_decoder"}
    assemble(tmp_path, PipelineOptions(serving={"networks": "bls"}))
    assert "unet" in served_models(tmp_path)  # BLS calls them: they must be loaded


def test_large_models_get_batch_caps(model, specs, tmp_path):
    # The paper's UNet (872 M parameters, 3.5 GB in fp32): UNet and VAE runs are capped.
    assert large_model_caps(872_000_000 * 4) == {"unet_max_batch": 4, "vae_max_batch": 1}
    # SD v1's (3.4 GB) at 64x64 latents: one guided request per UNet run.
    assert large_model_caps(860_000_000 * 4, 64) == {"unet_max_batch": 2, "vae_max_batch": 1}
    tiny = sum(p.numel() * 4 for p in model.model.parameters())
    assert large_model_caps(tiny) == {}  # the tiny one: batching pays, no caps
    # assemble reads the served UNet file's size (sparse: no disk used).
    out = write_built(tmp_path / "r", model, specs)
    with open(out / "unet" / "1" / "model.onnx", "r+b") as f:
        f.truncate(872_000_000 * 4)
    assemble(out)
    serving = read_pipeline_config(out / "ldm_txt2img_stream")[1]
    assert (serving.unet_max_batch, serving.vae_max_batch) == (4, 1)


def test_the_front_model_needs_the_streaming_model():
    # ldm_txt2img holds no networks: it passes requests to ldm_txt2img_stream.
    with pytest.raises(ValueError, match="write both"):
        PipelineOptions(models=("ldm_txt2img",))


def test_onnxruntime_networks_need_onnx_files(model, specs, tmp_path):
    trt = write_built(tmp_path / "r", model, specs, "tensorrt")
    with pytest.raises(ValueError, match="TensorRT repository has engines only: use "
                                         "networks=bls or torch"):
        assemble(trt, PipelineOptions(serving={"networks": "onnxruntime"}))
    # The PyTorch modules need their weights, which only --torch-weights builds write.
    with pytest.raises(ValueError, match="networks=torch needs the networks' PyTorch weights "
                                         ".* build with --torch-weights"):
        assemble(trt, PipelineOptions(serving={"networks": "torch"}))
    # A TensorRT build keeps its pipeline's loop beside the engines, on the GPU where there is.
    assemble(trt)
    serving = read_pipeline_config(trt / "ldm_txt2img_stream")[1]
    assert (serving.networks, serving.device) == ("bls", "auto")
    # Choosing ONNX Runtime drops the OpenVINO precision default with it (fp32).
    out = write_built(tmp_path / "p", model, specs)
    assemble(out, PipelineOptions(serving={"networks": "onnxruntime"}))
    serving = read_pipeline_config(out / "ldm_txt2img_stream")[1]
    assert (serving.networks, serving.precision) == ("onnxruntime", "fp32")
    with pytest.raises(ValueError,
                       match="networks\n  Input should be 'onnxruntime', 'openvino', 'torch' "
                             "or 'bls'"):
        ServingOptions(networks="gpu")


def test_read_pipeline_config_gives_back_what_was_written(repo):
    limits, serving, instances = read_pipeline_config(repo / "ldm_txt2img")
    assert limits.sizes == (16, 32) and limits.max_steps == 30
    assert serving.preview_every == 2 and serving.networks == "openvino"
    assert instances == 3
    assert read_pipeline_config(repo / "ldm_txt2img_stream")[2] == 1


def test_pipeline_facts(repo, model):
    version = repo / "ldm_txt2img" / "1"
    info = PipelineInfo.load(version)
    assert (info.latent_channels, info.downsample_factor, info.parameterization,
            info.max_seq_len, info.scale_factor) == (4, 4, "eps", 77, 0.5)
    # The UNet's (B,) timestep is declared dims [1] + reshape in the batched unet config.
    assert info.unet.model_dump() == {
        "model": "unet", "inputs": ["latent", "timestep", "context"], "output": "noise_pred",
        "unsqueeze": ["timestep"], "onnx": "unet/1/model.onnx", "max_batch": 6}
    assert info.text_encoder.unsqueeze == [] and info.vae_decoder.output == "image"
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


def test_model_folders_hold_no_copies_of_the_code(repo):
    # model.py imports the installed package: the folder holds its data files only.
    version = repo / "ldm_txt2img_stream" / "1"
    assert sorted(p.name for p in version.iterdir()) == [
        "alphas_cumprod.npy", "model.py", "pipeline.json", "tokenizer"]
    root = Path(__file__).parents[2]
    assert (version / "model.py").read_bytes() == (
        root / "server" / "triton_models" / "ldm_txt2img_stream" / "model.py").read_bytes()
    # What it imports resolves, from another folder and without PYTHONPATH, to the installed
    # package (this checkout, installed editable).
    code = ("import server.contract, server.txt2img, export.python_backend; "
            "print(server.txt2img.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    assert Path(out) == root / "server" / "txt2img.py"


def test_rejects_bad_options(model, specs, tmp_path):
    out = write_built(tmp_path / "r", model, specs)
    with pytest.raises(ValueError, match=r"sizes \[20\] are not covered"):
        assemble(out, PipelineOptions(limits={"sizes": [16, 20]}))
    with pytest.raises(ValueError, match="max_images 4 exceeds"):
        assemble(out, PipelineOptions(limits={"max_images": 4}))
    with pytest.raises(ValueError, match=r"unknown limit\(s\) \['max_step'\]"):
        assemble(out, PipelineOptions(limits={"max_step": 4}))
    with pytest.raises(ValueError, match="unknown pipeline model"):
        PipelineOptions(models=("txt2img", "ldm_txt2img_stream"))
    with pytest.raises(ValueError, match="preview_every"):
        assemble(out, PipelineOptions(serving={"preview_every": 0}))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary folder left
    assert not (out / "ldm_txt2img").exists()


def test_skipped_without_the_models_it_calls(model, specs, tmp_path):
    out = write_built(tmp_path / "r", model, specs, networks=("unet", "vae_decoder"))
    assert assemble(out) == []
    assert not (out / "ldm_txt2img_stream").exists()


def test_needs_a_built_repository(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json: build it first"):
        assemble(tmp_path)


def test_build_takes_the_pipeline_arguments_and_refuses_a_precision_they_do_not_run(
        tiny_ldm_dir, tmp_path, capsys):
    from server.build import main, pipeline_args

    own, rest = pipeline_args(["--networks", "openvino", "--precision", "auto", "--out", "r"])
    assert (own.networks, own.precision, rest) == ("openvino", "auto", ["--out", "r"])
    own, _ = pipeline_args(["--precision", "bf16"])  # the python backend's default: openvino
    assert (own.networks, own.precision) == (None, "bf16")
    out = tmp_path / "repo"
    assert main(["--checkpoint", str(tiny_ldm_dir), "--out", str(out), "--networks",
                 "onnxruntime", "--precision", "bf16"]) == 2
    assert "precision bf16 is not one networks=onnxruntime runs" in capsys.readouterr().err
    assert not out.exists()  # refused before exporting


def test_a_named_model_prefixes_its_pipeline_and_network_models(model, specs, tmp_path):
    from server.repository import repository_name, served_models

    out = write_built(tmp_path / "emoji", model, specs, prefix="emoji_")
    assert repository_name(out) == "emoji"
    assert assemble(out, PipelineOptions(name="emoji")) == ["emoji_txt2img",
                                                            "emoji_txt2img_stream"]
    info = PipelineInfo.load(out / "emoji_txt2img_stream" / "1")
    assert info.unet.model == "emoji_unet" and info.unet.onnx == "emoji_unet/1/model.onnx"
    cfg = read_config(out / "emoji_txt2img_stream" / "config.pbtxt")
    assert cfg.name == "emoji_txt2img_stream" and cfg.model_transaction_policy.decoupled
    assert served_models(out) == ("emoji_txt2img", "emoji_txt2img_stream")
    # The networks were named for "emoji": served under another name they would clash.
    with pytest.raises(ValueError, match="build it with --name shapes"):
        assemble(out, PipelineOptions(name="shapes"))
    with pytest.raises(ValueError, match="model name 'Bad_Name'"):
        PipelineOptions(name="Bad_Name")
