"""The HTTP gateway end to end: uvicorn on loopback in front of a real Triton server.

One Triton for the module (tiny prompt-sensitive LDM, test limits: sizes [16], up to 4 images,
up to 1000 steps), gateways started on free ports: an open one, one with API keys, and one
whose Triton address has nothing listening.
"""
from __future__ import annotations

import threading
import time

import httpx
import numpy as np
import pytest

from server.auth import KeyChecker, load_api_keys
from server.client import Txt2ImgClient, Txt2ImgError
from server.gateway import GatewaySettings, triton_error
from server.triton import free_port
from tests.server.serving import (
    decode_png,
    read_sse,
    running_gateway,
    settled_unet_calls,
    unet_counts,
)

PROMPT = "a red circle in the top left"
GEN = "/v1/images/generations"
STREAM = "/v1/images/generations/stream"


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway, timeout=60) as client:
        yield client


def images_of(body: dict) -> np.ndarray:
    return np.stack([decode_png(d["b64_json"]) for d in body["data"]])


def test_generations_happy_path(http, triton):
    t0 = time.time()
    r = http.post(GEN, json={"prompt": PROMPT, "n": 2, "size": "16x16", "steps": 3, "seed": 7,
                             "response_format": "b64_json", "negative_prompt": "blurry",
                             "guidance_scale": 4.0, "sampler": "plms"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"created", "data", "seed", "size", "warnings"}
    assert t0 - 1 <= body["created"] <= time.time() + 1
    assert body["seed"] == 7 and body["size"] == "16x16" and body["warnings"] == []
    assert [d["revised_prompt"] for d in body["data"]] == [None, None]
    images = images_of(body)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8
    # The gateway passes the pixels through unchanged: the same as asking Triton directly.
    with Txt2ImgClient(triton.grpc_url) as direct:
        want = direct.generate(PROMPT, num_images=2, steps=3, seed=7, negative_prompt="blurry",
                               guidance_scale=4.0, sampler="plms").images
    np.testing.assert_array_equal(images, want)


def test_same_seed_same_image_and_defaults(http):
    first = http.post(GEN, json={"prompt": PROMPT}).json()  # every default: n=1, seed random
    assert images_of(first).shape == (1, 16, 16, 3) and first["size"] == "16x16"
    again = http.post(GEN, json={"prompt": PROMPT, "seed": first["seed"]}).json()
    assert again["data"][0]["b64_json"] == first["data"][0]["b64_json"]
    other = http.post(GEN, json={"prompt": PROMPT, "seed": first["seed"] + 1}).json()
    assert not np.array_equal(images_of(other), images_of(first))


def test_stream_sends_progress_in_order_then_the_result(http, gateway):
    body = {"prompt": PROMPT, "n": 2, "steps": 5, "seed": 11}
    events = []
    with httpx.stream("POST", gateway + STREAM, json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        events = list(read_sse(r))
    kinds = [kind for kind, _ in events]
    assert kinds == ["progress"] * 5 + ["result"]
    assert [(d["step"], d["total"]) for _, d in events[:-1]] == [(i, 5) for i in range(1, 6)]
    for _, d in events[:-1]:  # a latent preview per image: 16 px / f=4 -> 4x4
        assert [decode_png(p).shape for p in d["previews"]] == [(4, 4, 3)] * 2
    result = events[-1][1]
    plain = http.post(GEN, json=body).json()
    assert result["seed"] == 11 and result["size"] == "16x16"
    np.testing.assert_array_equal(images_of(result), images_of(plain))

    with httpx.stream("POST", gateway + STREAM, json={**body, "preview": False},
                      timeout=60) as r:
        events = list(read_sse(r))
    assert all(d["previews"] == [] for kind, d in events if kind == "progress")
    assert events[-1][0] == "result"


def test_client_disconnect_cancels_the_triton_stream(gateway, triton):
    _, before = unet_counts(triton)
    seen = []
    t0 = time.monotonic()
    with httpx.stream("POST", gateway + STREAM, json={"prompt": PROMPT, "steps": 1000},
                      timeout=60) as r:
        for kind, data in read_sse(r):
            seen.append((kind, data["step"]))
            if len(seen) == 3:
                break  # leaving the block closes the connection
    # The gateway cancels the gRPC stream; Triton's loop stops at its next UNet call.
    last = settled_unet_calls(triton, t0, limit=30, quiet=1.5)
    assert seen == [("progress", 1), ("progress", 2), ("progress", 3)]
    assert 3 <= last - before < 200


def test_concurrent_requests_reach_triton_together(gateway, triton):
    exec_before, req_before = unet_counts(triton)
    results: list[httpx.Response] = []

    def post(seed: int) -> None:
        with httpx.Client(base_url=gateway, timeout=120) as c:
            results.append(c.post(GEN, json={"prompt": PROMPT, "steps": 8, "seed": seed}))

    def stream(seed: int) -> None:
        with httpx.stream("POST", gateway + STREAM, timeout=120,
                          json={"prompt": PROMPT, "steps": 8, "seed": seed}) as r:
            list(read_sse(r))
            results.append(r)

    threads = [threading.Thread(target=post, args=(s,)) for s in range(3)]
    threads += [threading.Thread(target=stream, args=(s,)) for s in range(3, 6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.status_code for r in results] == [200] * 6
    executions, requests = unet_counts(triton)
    assert requests - req_before >= 6 * 8  # one UNet request per step per request
    # Fewer executions than requests: steps of different HTTP requests met in one batch,
    # which needs them in flight at Triton at the same time.
    assert executions - exec_before < requests - req_before


BAD = [  # (body fields, status, message part, param)
    ({"size": "17x17"}, 400, "height 17 is not supported by this model; allowed: 16", "size"),
    ({"size": "16x32"}, 400, "height 32 is not supported by this model; allowed: 16", "size"),
    ({"size": "big"}, 422, "size must be 'WIDTHxHEIGHT' in pixels", "size"),
    ({"n": 9}, 400, "num_images must be in [1, 4], got 9", "n"),
    ({"n": 0}, 422, "n: Input should be greater than or equal to 1", "n"),
    ({"sampler": "euler"}, 400, "unknown sampler 'euler'; allowed: ddim, plms, dpmpp_2m, ddpm",
     "sampler"),
    ({"steps": 5000}, 400, "num_inference_steps must be in [1, 1000], got 5000", "steps"),
    ({"steps": 0}, 422, "steps: Input should be greater than or equal to 1", "steps"),
    ({"guidance_scale": 100.0}, 400, "guidance_scale must be in [0, 20], got 100",
     "guidance_scale"),
    ({"response_format": "url"}, 400, "response_format 'url' is not supported", "response_format"),
    ({"prompt": "x" * 2001}, 400, "prompt has 2001 characters; at most 2000", "prompt"),
    ({"prompt": ""}, 422, "prompt: String should have at least 1 character", "prompt"),
    ({"colour": "red"}, 422, "colour: Extra inputs are not permitted", "colour"),
]


@pytest.mark.parametrize("fields, status, message, param", BAD,
                         ids=[next(iter(f)) + str(i) for i, (f, *_) in enumerate(BAD)])
def test_bad_input_gets_4xx_with_a_message(http, fields, status, message, param):
    body = {"prompt": PROMPT, "steps": 2, **fields}
    for path in (GEN, STREAM):
        r = http.post(path, json=body)
        assert r.status_code == status, (path, r.text)
        err = r.json()["error"]
        assert message in err["message"], (path, err)
        assert err["param"] == param
        assert err["type"] == "invalid_request_error"
    assert http.get("/readyz").status_code == 200  # nothing broke


def test_missing_prompt_and_bad_json(http):
    r = http.post(GEN, json={"n": 1})
    assert r.status_code == 422 and "prompt: Field required" in r.json()["error"]["message"]
    assert set(r.json()) == {"error"}  # no pydantic `detail` echoing the input
    r = http.post(GEN, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    assert r.json()["error"]["message"].startswith("the body is not valid JSON: ")
    assert r.json()["error"]["code"] == "invalid_json"


def test_prompt_truncation_is_reported(http, gateway):
    long = "red circle " * 60  # 120 word pieces > 75
    body = http.post(GEN, json={"prompt": long, "steps": 2}).json()
    assert body["warnings"] == ["prompt truncated to 77 tokens"]
    with httpx.stream("POST", gateway + STREAM, timeout=60,
                      json={"prompt": PROMPT, "negative_prompt": long, "steps": 2}) as r:
        result = list(read_sse(r))[-1][1]
    assert result["warnings"] == ["negative_prompt truncated to 77 tokens"]


def test_health_readiness_config_and_docs(http):
    assert http.get("/healthz").json() == {"status": "ok"}
    assert http.get("/readyz").json() == {"status": "ready"}
    cfg = http.get("/v1/config").json()
    assert cfg["model"] == "ldm"
    assert cfg["limits"]["sizes"] == [16] and cfg["limits"]["max_steps"] == 1000
    assert cfg["limits"]["max_images"] == 4 and "ddim" in cfg["limits"]["samplers"]
    docs = http.get("/docs")
    assert docs.status_code == 200 and "swagger-ui-bundle.js" in docs.text
    assert "cdn" not in docs.text.lower()  # nothing may be fetched from outside
    assert http.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    paths = http.get("/openapi.json").json()["paths"]
    assert {GEN, STREAM, "/v1/config", "/healthz", "/readyz"} <= set(paths)
    page = http.get("/")
    assert page.status_code == 200 and "<form" in page.text
    for asset in ("/static/app.js", "/static/style.css"):
        assert http.get(asset).status_code == 200


def test_triton_down_gives_503_and_the_gateway_keeps_serving():
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there
    with running_gateway(GatewaySettings(triton_url=dead, timeout=10)) as url, \
            httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        ready = c.get("/readyz")
        assert ready.status_code == 503 and ready.json()["status"] == "unavailable"
        assert f"Triton at {dead} is unreachable" in ready.json()["detail"]
        for path in (GEN, STREAM):
            r = c.post(path, json={"prompt": PROMPT})
            assert r.status_code == 503, r.text
            err = r.json()["error"]
            assert f"Triton at {dead} is unavailable" in err["message"]
            assert err["code"] == "triton_unavailable"
        assert c.get("/v1/config").status_code == 503
        assert c.get("/healthz").status_code == 200  # still serving
        # Bad input is still refused as such, without asking Triton.
        assert c.post(GEN, json={"prompt": PROMPT, "response_format": "url"}).status_code == 400


@pytest.mark.parametrize("status, code", [
    ("StatusCode.INVALID_ARGUMENT", 400), ("400", 400), ("StatusCode.UNAVAILABLE", 503),
    ("StatusCode.NOT_FOUND", 503), ("StatusCode.DEADLINE_EXCEEDED", 504),
    ("StatusCode.INTERNAL", 502), (None, 502)])
def test_triton_error_statuses(status, code):
    err = triton_error(Txt2ImgError("boom", status), "h:1")
    assert err.status == code and "boom" in err.message


def test_api_keys_are_enforced(triton, tmp_path):
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text("# team keys\nfile-key\n\n")
    keys = load_api_keys(keys_file, env={"LDM_API_KEYS": " env-key , "})
    assert keys == {"file-key", "env-key"}
    settings = GatewaySettings(triton_url=triton.grpc_url, api_keys=keys, timeout=60)
    with running_gateway(settings) as url, httpx.Client(base_url=url, timeout=60) as c:
        body = {"prompt": PROMPT, "steps": 2}
        for path in (GEN, STREAM):
            r = c.post(path, json=body)
            assert r.status_code == 401
            assert "missing API key" in r.json()["error"]["message"]
            assert r.headers["www-authenticate"] == "Bearer"
            r = c.post(path, json=body, headers={"Authorization": "Bearer file-keyX"})
            assert r.status_code == 401 and r.json()["error"]["message"] == "invalid API key"
        assert c.post(GEN, json=body, headers={"Authorization": "Basic env-key"}).status_code \
            == 401
        assert c.get("/v1/config").status_code == 401
        for key in ("file-key", "env-key"):
            auth = {"Authorization": f"Bearer {key}"}
            assert c.post(GEN, json=body, headers=auth).status_code == 200
            with c.stream("POST", STREAM, json=body, headers=auth) as r:
                assert r.status_code == 200 and list(read_sse(r))[-1][0] == "result"
        # Health checks and the page stay open.
        assert c.get("/healthz").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.get("/").status_code == 200 and c.get("/static/app.js").status_code == 200


def test_key_checker_and_key_files(tmp_path):
    checker = KeyChecker(["alpha", "beta"])
    assert checker.enabled and checker.check("beta") and not checker.check("gamma")
    assert not checker.check("alph") and not checker.check("")
    assert not KeyChecker([]).enabled
    assert load_api_keys(env={}) == frozenset()
    bad = tmp_path / "bad.txt"
    bad.write_text("two words\n")
    with pytest.raises(ValueError, match="whitespace"):
        load_api_keys(bad, env={})
