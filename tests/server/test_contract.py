import math

import numpy as np
import pytest

from server.contract import (
    INPUTS,
    KNOWN_SAMPLERS,
    MAX_SEED,
    GenerationRequest,
    InvalidRequest,
    Limits,
    PipelineInfo,
    ServingOptions,
    check_parameters,
    parse_request,
)

LIMITS = Limits(sizes=(256, 128, 320), max_steps=50, min_guidance_scale=1.0,
                max_guidance_scale=12.0, max_images=3, max_prompt_chars=40,
                samplers=("ddim", "dpmpp_2m"), default_steps=20, default_guidance_scale=7.5,
                default_sampler="dpmpp_2m")


def _bytes(s: str | bytes) -> np.ndarray:
    return np.array([s.encode() if isinstance(s, str) else s], dtype=np.object_)


def test_known_samplers_match_the_registry():
    from ldm.samplers import SAMPLERS

    assert sorted(KNOWN_SAMPLERS) == sorted(SAMPLERS)


def test_inputs_cover_the_request_fields():
    assert set(INPUTS) == {"prompt", "negative_prompt", "num_inference_steps", "guidance_scale",
                           "seed", "sampler", "num_images", "height", "width"}


def test_defaults_fill_missing_inputs():
    req = parse_request({"prompt": _bytes("a red circle"), "seed": np.array([7])}, LIMITS)
    assert req == GenerationRequest(prompt="a red circle", negative_prompt="", steps=20,
                                    guidance_scale=7.5, seed=7, sampler="dpmpp_2m",
                                    num_images=1, height=256, width=256)


def test_all_inputs_parsed():
    req = parse_request({
        "prompt": _bytes("x"), "negative_prompt": _bytes("blurry"),
        "num_inference_steps": np.array([50], np.int32),
        "guidance_scale": np.array([1.0], np.float32), "seed": np.array([MAX_SEED], np.int64),
        "sampler": _bytes(" DDIM "), "num_images": np.array([3], np.int32),
        "height": np.array([128], np.int32), "width": np.array([320], np.int32),
    }, LIMITS)
    assert (req.negative_prompt, req.steps, req.guidance_scale, req.seed, req.sampler,
            req.num_images, req.height, req.width) == ("blurry", 50, 1.0, MAX_SEED, "ddim", 3,
                                                       128, 320)


def test_absent_optional_inputs_may_be_none():
    req = parse_request({"prompt": _bytes("x"), "negative_prompt": None, "seed": None}, LIMITS)
    assert req.negative_prompt == ""
    assert 0 <= req.seed <= MAX_SEED


def test_missing_seed_draws_a_fresh_one():
    seeds = {parse_request({"prompt": _bytes("x")}, LIMITS).seed for _ in range(8)}
    assert len(seeds) > 1


@pytest.mark.parametrize("inputs, message", [
    ({"prompt": _bytes(b"\xff\xfe")}, "prompt is not valid UTF-8"),
    ({"prompt": _bytes("x" * 41)}, "prompt has 41 characters; at most 40"),
    ({"negative_prompt": _bytes("y" * 41)}, "negative_prompt has 41 characters"),
    ({"prompt": np.array([b"a", b"b"], dtype=np.object_)}, "prompt must hold exactly one value"),
    ({"prompt": np.array([1.5])}, "prompt must be a string"),
    ({"num_inference_steps": np.array([0])}, "num_inference_steps must be in [1, 50], got 0"),
    ({"num_inference_steps": np.array([51])}, "num_inference_steps must be in [1, 50], got 51"),
    ({"num_inference_steps": np.array([2.0])}, "num_inference_steps must be an integer"),
    ({"guidance_scale": np.array([12.5], np.float32)}, "guidance_scale must be in [1, 12]"),
    ({"guidance_scale": np.array([0.5], np.float32)}, "guidance_scale must be in [1, 12]"),
    ({"guidance_scale": np.array([math.nan], np.float32)}, "guidance_scale must be in"),
    ({"guidance_scale": np.array([math.inf], np.float32)}, "guidance_scale must be in"),
    ({"seed": np.array([-1])}, f"seed must be in [0, {MAX_SEED}], got -1"),
    ({"sampler": _bytes("plms")}, "unknown sampler 'plms'; allowed: ddim, dpmpp_2m"),
    ({"sampler": _bytes("euler")}, "unknown sampler 'euler'"),
    ({"num_images": np.array([4])}, "num_images must be in [1, 3], got 4"),
    ({"num_images": np.array([0])}, "num_images must be in [1, 3], got 0"),
    ({"height": np.array([64])},
     "height 64 is not supported by this model; allowed: 256, 128, 320"),
    ({"width": np.array([257])}, "width 257 is not supported"),
    ({"steps": np.array([3])}, "unknown input(s) ['steps']"),
])
def test_bad_values_raise_clear_errors(inputs, message):
    with pytest.raises(InvalidRequest) as e:
        parse_request({"prompt": _bytes("a red circle"), **inputs}, LIMITS)
    assert message in str(e.value)


def test_prompt_is_required():
    with pytest.raises(InvalidRequest, match="'prompt' is required"):
        parse_request({"seed": np.array([1])}, LIMITS)


def test_parameters_round_trip():
    params = LIMITS.to_parameters()
    assert all(isinstance(v, str) for v in params.values())
    assert params["sizes"] == "256,128,320" and params["samplers"] == "ddim,dpmpp_2m"
    assert Limits.from_parameters({**params, "preview": "latent"}) == LIMITS


def test_parameters_need_sizes_and_valid_numbers():
    with pytest.raises(ValueError, match="sizes"):
        Limits.from_parameters({"max_steps": "10"})
    with pytest.raises(ValueError, match=r"parameter max_steps='ten'"):
        Limits.from_parameters({"sizes": "16", "max_steps": "ten"})


@pytest.mark.parametrize("kwargs, message", [
    ({"sizes": ()}, "sizes"),
    ({"max_steps": 10, "default_steps": 11}, "default_steps"),
    ({"min_guidance_scale": 3.0, "max_guidance_scale": 2.0, "default_guidance_scale": 2.5},
     "guidance range"),
    ({"default_guidance_scale": 30.0}, "default_guidance_scale"),
    ({"samplers": ("ddim", "euler")}, "unknown sampler"),
    ({"samplers": ("plms",)}, "default_sampler"),
    ({"max_images": 0}, "max_images"),
])
def test_inconsistent_limits_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Limits(**{"sizes": (16,), **kwargs})


def test_the_contract_imports_no_torch():
    import subprocess
    import sys

    code = "import sys, server.contract; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_request_round_trips_through_triton_inputs():
    req = GenerationRequest(prompt="é ✓", negative_prompt="blurry", steps=7, guidance_scale=2.5,
                            seed=MAX_SEED, sampler="ddim", num_images=2, height=128, width=320)
    inputs = req.to_inputs()
    assert set(inputs) == set(INPUTS)  # the Triton names: steps travels as num_inference_steps
    assert inputs["num_inference_steps"].dtype == np.int32 and inputs["seed"].dtype == np.int64
    assert inputs["prompt"][0] == "é ✓".encode()
    assert GenerationRequest.from_inputs(inputs) == req
    assert GenerationRequest.from_inputs(inputs).resolve(LIMITS) == req
    partial = GenerationRequest(prompt="x", steps=3)
    assert set(partial.to_inputs()) == {"prompt", "num_inference_steps"}  # None: left out


def test_request_types_are_strict():
    with pytest.raises(ValueError, match="steps"):
        GenerationRequest(prompt="x", steps=2.0)
    with pytest.raises(ValueError, match="guidance_scale"):
        GenerationRequest(prompt="x", guidance_scale="2")
    with pytest.raises(ValueError, match="colour"):
        GenerationRequest(prompt="x", colour="red")


def test_serving_options_parsed_from_parameters():
    opts = ServingOptions.from_parameters({"preview": "none", "max_concurrent": " 3 ",
                                           "sizes": "16"})  # another model's keys: ignored
    assert (opts.preview, opts.max_concurrent, opts.networks) == ("none", 3, "bls")
    assert ServingOptions.from_parameters(opts.to_parameters()) == opts
    with pytest.raises(ValueError, match=r"parameter max_concurrent='0'"):
        ServingOptions.from_parameters({"max_concurrent": "0"})
    with pytest.raises(ValueError, match=r"parameter batch_wait_ms='1.5'"):
        ServingOptions.from_parameters({"batch_wait_ms": "1.5"})
    with pytest.raises(ValueError, match=r"parameter preview='full'"):
        ServingOptions.from_parameters({"preview": "full"})


def test_unknown_parameters_refused():
    check_parameters({**LIMITS.to_parameters(), **ServingOptions().to_parameters(),
                      "EXECUTION_ENV_PATH": "/env"})
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['max_step'\]"):
        check_parameters({"max_step": "3"})


def test_pipeline_info_round_trip(tmp_path):
    info = PipelineInfo(latent_channels=4, downsample_factor=8, parameterization="x0",
                        max_seq_len=77, scale_factor=0.18215)
    info.save(tmp_path)
    assert PipelineInfo.load(tmp_path) == info
    assert info.target("unet").unsqueeze == ["timestep"]


def test_precision_is_one_the_networks_run():
    assert ServingOptions(networks="openvino", precision="bf16").precision == "bf16"
    assert ServingOptions(networks="torch", precision="fp16").precision == "fp16"
    with pytest.raises(ValueError, match=r"precision bf16 is not one networks=onnxruntime runs "
                                         r"\(it runs fp32\)"):
        ServingOptions(networks="onnxruntime", precision="bf16")
    with pytest.raises(ValueError, match="precision fp16 is not one networks=openvino runs"):
        ServingOptions.from_parameters({"networks": "openvino", "precision": "fp16"})
    with pytest.raises(ValueError, match=r"parameter precision='int8'"):
        ServingOptions.from_parameters({"networks": "torch", "precision": "int8"})
