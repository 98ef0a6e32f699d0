"""Two models in one Triton: named pipelines and networks, the API's `model` field, GET
/v1/models, 404s that list the models, and the gRPC client's --model."""
from __future__ import annotations

import httpx
import numpy as np
import pytest

from server.client import Txt2ImgClient
from server.client import main as client_main
from server.triton import TritonServer
from tests.server.conftest import psnr
from tests.server.serving import build_served_repository, decode_png, export_cache

PROMPT = "a red circle in the top left"


def build_named(checkpoint, out, work_dir, name: str):
    """A repository of `checkpoint` served as `name` (networks on ONNX Runtime in process)."""
    from export.repository import BuildOptions, build_repository
    from export.specs import ShapeLimits
    from export.triton_config import TritonOptions
    from server.repository import PipelineOptions, assemble

    options = BuildOptions(models=("text_encoder", "unet", "vae_decoder"),
                           limits=ShapeLimits(max_batch=4),
                           triton=TritonOptions(threads=1, name_prefix=f"{name}_"))
    build_repository(checkpoint, out, options, work_dir=work_dir, progress=False)
    assemble(out, PipelineOptions(name=name, serving={"networks": "onnxruntime"}))
    return out


@pytest.fixture(scope="module")
def two(served_ldm_dir, tiny_ldm_dir, tmp_path_factory):
    from server.repository import served_models

    tmp = tmp_path_factory.mktemp("two")
    main = build_served_repository(served_ldm_dir, tmp / "main", export_cache(tmp_path_factory))
    other = build_named(tiny_ldm_dir, tmp / "tiny", tmp / "work", "tiny")
    names = {p.name for p in other.iterdir() if p.is_dir()}
    assert {"tiny_unet", "tiny_txt2img", "tiny_txt2img_stream"} <= names and "unet" not in names
    models = (*served_models(main), *served_models(other))
    with TritonServer([main, other], log_path=tmp / "triton.log", models=models) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(two):
    from server.gateway import GatewaySettings
    from tests.server.serving import running_gateway

    with running_gateway(GatewaySettings(triton_url=two.grpc_url, timeout=60)) as url:
        yield url


def test_grpc_clients_pick_a_model_by_name(two):
    kw = dict(seed=3, steps=3, num_images=1)
    with Txt2ImgClient(two.grpc_url, timeout=60) as default:
        a = default.generate(PROMPT, **kw).images
    with Txt2ImgClient(two.grpc_url, model="tiny_txt2img", stream_model="tiny_txt2img_stream",
                       timeout=60) as tiny:
        b = tiny.generate(PROMPT, **kw).images
        streamed = tiny.stream(PROMPT, **kw).images
    assert a.shape == b.shape and psnr(a, b) < 30  # two different models
    np.testing.assert_array_equal(b, streamed)


def test_the_client_cli_takes_a_model(two, tmp_path, capsys):
    out = tmp_path / "x.png"
    assert client_main([PROMPT, "--url", two.grpc_url, "--model", "tiny", "--steps", "2",
                        "-o", str(out), "--no-stream"]) == 0
    assert out.is_file()
    assert client_main([PROMPT, "--url", two.grpc_url, "--model", "nope", "-o",
                        str(out)]) == 1
    assert "nope_txt2img" in capsys.readouterr().err


def test_the_api_lists_and_picks_models(gateway, two):
    listed = httpx.get(f"{gateway}/v1/models").json()
    assert listed["object"] == "list"
    assert [m["id"] for m in listed["data"]] == ["ldm", "tiny"]  # the default first
    assert all(m["object"] == "model" for m in listed["data"])
    one = httpx.get(f"{gateway}/v1/models/tiny").json()
    assert one["id"] == "tiny" and one["limits"]["sizes"] == [16]
    assert httpx.get(f"{gateway}/v1/config", params={"model": "tiny"}).json()["model"] == "tiny"
    body = {"prompt": PROMPT, "seed": 3, "steps": 3, "n": 1}
    r = httpx.post(f"{gateway}/v1/images/generations", json={**body, "model": "tiny"},
                   timeout=60)
    assert r.status_code == 200, r.text
    with Txt2ImgClient(two.grpc_url, model="tiny_txt2img", stream_model="tiny_txt2img_stream",
                       timeout=60) as tiny:
        want = tiny.generate(PROMPT, seed=3, steps=3, num_images=1).images[0]
    np.testing.assert_array_equal(decode_png(r.json()["data"][0]["b64_json"]), want)
    default = httpx.post(f"{gateway}/v1/images/generations", json=body, timeout=60).json()
    assert not np.array_equal(decode_png(default["data"][0]["b64_json"]), want)


@pytest.mark.parametrize("path", ["/v1/images/generations", "/v1/images/generations/stream"])
def test_an_unknown_model_is_a_404_listing_the_served_ones(gateway, path):
    r = httpx.post(f"{gateway}{path}", json={"prompt": PROMPT, "model": "dall-e-3"}, timeout=30)
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == "model 'dall-e-3' is not served; models: ldm, tiny"
    assert httpx.get(f"{gateway}/v1/models/dall-e-3").status_code == 404
    assert httpx.get(f"{gateway}/v1/config", params={"model": "x"}).status_code == 404


def test_the_launcher_takes_more_models(tmp_path, tiny_ldm_dir, capsys):
    from server.launcher import parse_args
    from server.served import served_models_of

    args = parse_args(["--checkpoint", str(tiny_ldm_dir), "--name", "shapes", "--model",
                       f"emoji={tiny_ldm_dir}", "--repository", str(tmp_path / "repo")])
    models = served_models_of(args)
    assert [(m.name, m.repository.name) for m in models] == [("shapes", "repo"),
                                                             ("emoji", "repo-emoji")]
    for bad, message in [("emoji", "expected NAME=CHECKPOINT"),
                         (f"Emoji={tiny_ldm_dir}", "expected NAME=CHECKPOINT"),
                         ("emoji=/no/such", "checkpoint /no/such not found"),
                         (f"ldm={tiny_ldm_dir}", "model names must differ")]:
        with pytest.raises(SystemExit):
            parse_args(["--model", bad])
        assert message in capsys.readouterr().err


def test_the_page_has_a_model_picker(gateway, two):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    from tests.server.test_web import browser_driver, decode_data_url, open_page, result_images
    from tests.server.test_web import wait as wait_for

    with browser_driver() as driver:
        open_page(driver, gateway)
        picker = Select(driver.find_element(By.ID, "model"))
        assert [o.get_attribute("value") for o in picker.options] == ["ldm", "tiny"]
        picker.select_by_value("tiny")
        driver.find_element(By.ID, "prompt").send_keys(PROMPT)
        driver.find_element(By.ID, "seed").send_keys("3")
        driver.execute_script("const el = document.getElementById('steps'); el.value = 3;"
                              "el.dispatchEvent(new Event('input'));")
        driver.find_element(By.ID, "generate").click()
        wait_for(driver, lambda d: len(result_images(d)) == 1)
        got = decode_data_url(result_images(driver)[0].get_attribute("src"))
        assert "tiny" in driver.find_element(By.CSS_SELECTOR, "#grid .batch-meta").text
    with Txt2ImgClient(two.grpc_url, model="tiny_txt2img", stream_model="tiny_txt2img_stream",
                       timeout=60) as tiny:
        limits_default = httpx.get(f"{gateway}/v1/config", params={"model": "tiny"}).json()
        want = tiny.generate(PROMPT, seed=3, steps=3, num_images=1,
                             guidance_scale=limits_default["limits"]["default_guidance_scale"]
                             ).images[0]
    np.testing.assert_array_equal(got, want)
