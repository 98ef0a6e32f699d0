"""The gateway against hostile or broken clients: a real uvicorn + Triton, raw sockets where
httpx would hide what the server does (a body never sent, a connection left half-open).

Every answer, refusal or not, must be OpenAI's error shape, and must leave the gateway (and
where the body was read, the connection) serving.
"""
from __future__ import annotations

import json
import logging
import socket
import time
from pathlib import Path

import httpx
import pytest
import yaml

from server.gateway import GatewaySettings, GatewayThread, create_app, redact_query
from server.schemas import ImageGenerationRequest
from server.triton import free_port
from tests.server.serving import read_sse, running_gateway, settled_unet_calls, unet_counts

PROMPT = "a red circle in the top left"
GEN = "/v1/images/generations"
STREAM = "/v1/images/generations/stream"
JSON = {"content-type": "application/json"}
ERROR_KEYS = {"message", "type", "param", "code"}
DEMO_CONFIG = Path(__file__).resolve().parents[2] / "checkpoints/demo/ldm/config.yaml"


@pytest.fixture(scope="module")
def http(gateway):
    with httpx.Client(base_url=gateway, timeout=60) as client:
        yield client


def error_of(r: httpx.Response) -> dict:
    """The OpenAI-shaped error of `r`, checking that shape exactly."""
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    return body["error"]


def client_port(r: httpx.Response) -> int:
    """The local port of the connection that carried `r`."""
    return r.extensions["network_stream"].get_extra_info("client_addr")[1]


def raw_exchange(url: str, data: bytes, wait: float = 20) -> tuple[int, dict, bytes, float]:
    """Send `data` on a fresh socket and read until the server closes it (else socket.timeout
    after `wait` s): (status, headers, body, seconds until closed)."""
    u = httpx.URL(url)
    t0 = time.monotonic()
    with socket.create_connection((u.host, u.port), timeout=wait) as s:
        s.sendall(data)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    elapsed = time.monotonic() - t0
    if not received:
        return 0, {}, b"", elapsed
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines)}
    return int(status_line.split()[1]), headers, body, elapsed


def post_head(path: str, extra: str = "", length: int | None = None) -> bytes:
    framing = "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"
    return (f"POST {path} HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
            f"{framing}\r\n{extra}\r\n").encode()


# --- 1. non-finite numbers and lone surrogates ---------------------------------------------

UNSERIALISABLE = {  # Python's json.loads takes all of these; no JSON encoder gives them back
    "nan": b'{"prompt": "x", "guidance_scale": NaN}',
    "inf": b'{"prompt": "x", "guidance_scale": Infinity}',
    "-inf": b'{"prompt": "x", "steps": -Infinity}',
    "1e309": b'{"prompt": "x", "guidance_scale": 1e309}',
    "surrogate": b'{"prompt": "\\ud800"}',
    "surrogate-key": b'{"prompt": "x", "\\udc00": 1}',
    "nan-extra": b'{"prompt": "x", "colour": NaN}',
}


@pytest.mark.parametrize("raw", UNSERIALISABLE.values(), ids=UNSERIALISABLE.keys())
def test_unserialisable_input_is_a_400_and_the_connection_lives_on(gateway, raw):
    with httpx.Client(base_url=gateway, timeout=60) as c:
        for path in (GEN, STREAM):
            bad = c.post(path, content=raw, headers=JSON)
            assert bad.status_code == 400, (path, bad.text)
            err = error_of(bad)
            assert err["type"] == "invalid_request_error" and err["code"] == "invalid_json"
            assert "finite" in err["message"] or "surrogate" in err["message"]
            assert bad.headers.get("connection") != "close"
            good = c.post(GEN, json={"prompt": PROMPT, "steps": 2})
            assert good.status_code == 200, good.text
            assert client_port(good) == client_port(bad)  # the same keep-alive connection


def test_a_valid_surrogate_pair_is_fine(http):
    r = http.post(GEN, content=b'{"prompt": "a red \\ud83d\\ude00", "steps": 2}', headers=JSON)
    assert r.status_code == 200, r.text


# --- 5. parse errors, 404/405 and strict types in OpenAI's shape ----------------------------

UNPARSABLE = {
    "not-json": b"{not json",
    "bad-utf8": b'{"prompt": "\xff\xfe"}',
    "utf16": '{"prompt": "x"}'.encode("utf-16"),
    "deep": b'{"prompt": "x", "user": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "nested-40": b'{"prompt": "x", "user": ' + b"[" * 40 + b"]" * 40 + b"}",
    "huge-int": b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}",
}


@pytest.mark.parametrize("raw", UNPARSABLE.values(), ids=UNPARSABLE.keys())
def test_unparsable_bodies_are_400_in_openai_shape(http, raw):
    for path in (GEN, STREAM):
        r = http.post(path, content=raw, headers=JSON)
        assert r.status_code == 400, (path, r.text)
        err = error_of(r)
        assert err["code"] == "invalid_json" and err["type"] == "invalid_request_error"
        assert err["message"].startswith("the body is not valid JSON: ")
        assert len(err["message"]) < 300
    assert http.get("/healthz").status_code == 200


def test_404_and_405_are_in_openai_shape(http):
    for path in ("/nope", "/v1/nope"):
        r = http.get(path)
        assert r.status_code == 404 and error_of(r)["code"] == "not_found"
    r = http.get(GEN)
    assert r.status_code == 405 and error_of(r)["code"] == "method_not_allowed"
    assert r.headers["allow"] == "POST"


STRICT = [  # (fields, param): JSON of the wrong type is refused, not coerced
    ({"n": "2"}, "n"), ({"n": True}, "n"), ({"n": 2.0}, "n"), ({"steps": "3"}, "steps"),
    ({"seed": True}, "seed"), ({"guidance_scale": True}, "guidance_scale"),
    ({"guidance_scale": "4"}, "guidance_scale"), ({"prompt": 5}, "prompt"),
    ({"size": "٢٥٦x٢٥٦"}, "size"), ({"size": "１６x１６"}, "size"), ({"size": "16x16\n7"}, "size"),
]


@pytest.mark.parametrize("fields, param", STRICT, ids=[str(f) for f, _ in STRICT])
def test_strict_types_and_ascii_sizes(http, fields, param):
    for path in (GEN, STREAM):
        r = http.post(path, json={"prompt": PROMPT, "steps": 2, **fields})
        assert r.status_code == 422, (path, r.text)
        err = error_of(r)
        assert err["param"] == param and err["type"] == "invalid_request_error"


def test_strict_still_takes_an_integer_guidance_scale(http):
    r = http.post(GEN, json={"prompt": PROMPT, "steps": 2, "guidance_scale": 4, "n": 1})
    assert r.status_code == 200, r.text
    r = http.post(STREAM, json={"prompt": PROMPT, "steps": 2, "preview": "yes"})
    assert r.status_code == 422 and error_of(r)["param"] == "preview"


def test_the_openapi_example_is_a_size_the_demo_model_serves(http):
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())["config"]
    f = 2 ** (len(cfg["first_stage"]["ddconfig"]["ch_mult"]) - 1)  # the autoencoder's factor
    side = cfg["diffusion"]["image_size"] * f  # latent side x f
    example = ImageGenerationRequest.model_config["json_schema_extra"]["examples"][0]
    assert example["size"] == f"{side}x{side}"
    ImageGenerationRequest.model_validate(example)
    schema = http.get("/openapi.json").json()["components"]["schemas"]
    assert schema["ImageGenerationRequest"]["examples"][0]["size"] == f"{side}x{side}"


# --- 2. body size, and the API key before the body ------------------------------------------

@pytest.fixture(scope="module")
def guarded(triton):
    """A gateway with API keys, a 2000-byte body limit, 3 s for a body and 1 s for headers."""
    settings = GatewaySettings(triton_url=triton.grpc_url, timeout=60, api_keys=frozenset({"k"}),
                               max_body_bytes=2000, body_timeout=3.0, header_timeout=1.0)
    with running_gateway(settings) as url:
        yield url


AUTH = "Authorization: Bearer k\r\n"


def test_a_declared_huge_body_is_refused_unread(guarded):
    # Headers only: the body is never sent, so an answer proves the gateway did not wait for it.
    status, headers, body, _ = raw_exchange(guarded, post_head(GEN, AUTH, length=10**9))
    assert status == 413 and headers["connection"] == "close"
    err = json.loads(body)["error"]
    assert err["code"] == "request_too_large" and "2000 bytes" in err["message"]


def test_the_api_key_is_decided_before_the_body(guarded):
    for extra in ("", "Authorization: Bearer wrong\r\n"):
        for length in (10**9, 100):  # neither sent: a 401 at once, not a 408 or 413
            status, headers, body, elapsed = raw_exchange(guarded, post_head(GEN, extra, length))
            assert status == 401 and headers["www-authenticate"] == "Bearer"
            assert json.loads(body)["error"]["type"] == "authentication_error"
            assert elapsed < 2  # not after the 3 s body timeout
    status, _, _, _ = raw_exchange(guarded, b"GET /v1/config?api_key=k HTTP/1.1\r\nHost: g\r\n"
                                            b"Connection: close\r\n\r\n")
    assert status == 401  # a key in the query string does not count


def test_a_chunked_body_is_counted_and_stopped_at_the_limit(guarded):
    chunk = b"400\r\n" + b" " * 0x400 + b"\r\n"  # 1024 bytes; no final chunk is ever sent
    status, headers, body, elapsed = raw_exchange(guarded, post_head(GEN, AUTH) + chunk * 3)
    assert status == 413 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_too_large"
    assert elapsed < 2
    with httpx.Client(base_url=guarded, timeout=60, headers={"Authorization": "Bearer k"}) as c:
        def small():  # chunked too, under the limit
            yield json.dumps({"prompt": "x" * 1500, "steps": 2}).encode()
        assert c.post(GEN, content=small(), headers=JSON).status_code == 200
        assert c.get("/v1/config").status_code == 200


# --- 3. slow clients -----------------------------------------------------------------------

def test_a_stalled_body_gets_408(guarded):
    status, headers, body, elapsed = raw_exchange(
        guarded, post_head(GEN, AUTH, length=100) + b'{"prompt": ')
    assert status == 408 and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert 2.9 < elapsed < 8


def test_stalled_headers_close_the_connection(guarded):
    status, _, _, elapsed = raw_exchange(guarded, b"POST /v1/images/generations HTTP/1.1\r\n"
                                                  b"Host: gateway\r\n")
    assert status == 0 and 0.9 < elapsed < 5  # closed without an answer
    with httpx.Client(base_url=guarded, timeout=60) as c:
        assert c.get("/healthz").status_code == 200


def test_uvicorn_gets_the_limits():
    settings = GatewaySettings(keep_alive_timeout=3, max_header_bytes=4096)
    config = GatewayThread(create_app(settings), port=free_port()).server.config
    assert config.timeout_keep_alive == 3 and config.h11_max_incomplete_event_size == 4096


# --- 4. keys in the access log --------------------------------------------------------------

class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_the_access_log_redacts_keys_in_query_strings(triton):
    handler, access = ListHandler(), logging.getLogger("uvicorn.access")
    access.addHandler(handler)
    app = create_app(GatewaySettings(triton_url=triton.grpc_url, api_keys=frozenset({"k"})))
    gateway = GatewayThread(app, port=free_port(), log_level="info").start()
    try:
        with httpx.Client(base_url=gateway.url, timeout=30) as c:
            assert c.get("/healthz?api_key=sk-secret1&page=2").status_code == 200
            assert c.get("/v1/config?access_token=sk-secret2").status_code == 401
            assert c.get("/healthz?x=1&Api%5FKey=sk-secret3&token").status_code == 200
    finally:
        gateway.stop()
        access.removeHandler(handler)
    log = "\n".join(handler.lines)
    assert len(handler.lines) == 3, log
    assert "sk-secret" not in log
    assert "/healthz?api_key=REDACTED&page=2" in log
    assert "/v1/config?access_token=REDACTED" in log
    assert "/healthz?x=1&Api%5FKey=REDACTED&token" in log


def test_redact_query():
    assert redact_query("/a?key=1&b=2&auth_token=3") == "/a?key=REDACTED&b=2&auth_token=REDACTED"
    assert redact_query("/a") == "/a" and redact_query("/a?q=cat") == "/a?q=cat"


# --- 6. a plain request's client going away ------------------------------------------------

def test_client_disconnect_cancels_a_plain_generation(gateway, triton, caplog):
    caplog.set_level(logging.INFO, logger="server.gateway")
    _, before = unet_counts(triton)
    t0 = time.monotonic()
    # 1000 steps take seconds here (~400 UNet calls/s); the client gives up after 0.3 s.
    with httpx.Client(base_url=gateway, timeout=httpx.Timeout(60, read=0.3)) as c, \
            pytest.raises(httpx.ReadTimeout):
        c.post(GEN, json={"prompt": PROMPT, "steps": 1000})
    # Triton's loop stops at its next UNet call once the gateway cancels the gRPC call.
    last = settled_unet_calls(triton, t0, limit=60, quiet=1.5)
    assert 1 <= last - before < 1000, last - before  # 1000: it ran to the end
    assert "client went away: generation cancelled" in caplog.messages
    with httpx.Client(base_url=gateway, timeout=60) as c:
        assert c.post(GEN, json={"prompt": PROMPT, "steps": 2}).status_code == 200


def test_streams_and_keep_alive_still_work_through_the_guard(gateway):
    with httpx.stream("POST", gateway + STREAM, json={"prompt": PROMPT, "steps": 2},
                      timeout=60) as r:
        assert [kind for kind, _ in read_sse(r)] == ["progress", "progress", "result"]
    with httpx.Client(base_url=gateway, timeout=60) as c:  # the disconnect watch lets go
        ports = {client_port(c.post(GEN, json={"prompt": PROMPT, "steps": 2}))
                 for _ in range(3)}
    assert len(ports) == 1

