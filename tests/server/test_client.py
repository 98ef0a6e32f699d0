"""Client helpers that need no server: inputs, PNG files, errors, arguments."""
from __future__ import annotations

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image

from server.client import Txt2ImgError, build_inputs, parse_args, save_pngs
from server.contract import GenerationRequest


@pytest.mark.parametrize("module", [grpcclient, httpclient])
def test_build_inputs_types_and_shapes(module):
    inputs = build_inputs(module, GenerationRequest(
        prompt="a red circle", steps=5, guidance_scale=7.5, seed=2**40, sampler="ddim",
        negative_prompt=None))
    got = {i.name(): (i.datatype(), i.shape()) for i in inputs}
    assert got == {"prompt": ("BYTES", [1]), "num_inference_steps": ("INT32", [1]),
                   "guidance_scale": ("FP32", [1]), "seed": ("INT64", [1]),
                   "sampler": ("BYTES", [1])}  # None: left out


def test_requests_refuse_unknown_names():
    from server.client import as_request

    with pytest.raises(ValueError, match="colour"):
        as_request("x", {"colour": "red"})
    assert as_request("x", {"steps": 3, "seed": None}) == GenerationRequest(prompt="x", steps=3)


def test_save_pngs(tmp_path):
    rng = np.random.default_rng(0)
    one = rng.integers(0, 256, (1, 8, 6, 3), dtype=np.uint8)
    assert save_pngs(one, tmp_path / "a.png") == [tmp_path / "a.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "a.png")), one[0])
    three = rng.integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    paths = save_pngs(three, tmp_path / "sub" / "b.png")
    assert [p.name for p in paths] == ["b_0.png", "b_1.png", "b_2.png"]
    for p, image in zip(paths, three, strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), image)


def test_error_status():
    assert Txt2ImgError("bad", "StatusCode.INVALID_ARGUMENT").invalid_argument
    assert Txt2ImgError("bad", "400").invalid_argument
    assert not Txt2ImgError("boom", "StatusCode.INTERNAL").invalid_argument


def test_cli_arguments():
    args = parse_args(["a red circle", "--steps", "5", "--seed", "3", "--sampler", "plms"])
    assert (args.prompt, args.steps, args.seed, args.sampler) == ("a red circle", 5, 3, "plms")
    assert str(args.output) == "out.png" and args.url == "localhost:8001"
    assert args.guidance_scale is None and not args.no_stream
