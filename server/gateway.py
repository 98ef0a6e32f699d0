"""HTTP gateway in front of Triton: an OpenAI-style images API, progress events, a web page.

    python -m server.gateway --triton-url localhost:8001 --port 8080   # Triton runs elsewhere
    python -m server                                                    # Triton + gateway

Routes (`create_app(settings)`):

    POST /v1/images/generations         {"prompt", "n", "size": "WxH", ...} -> PNGs (base64)
    POST /v1/images/generations/stream  same body -> server-sent events: `progress` per
                                        sampler step, then `result` (or `error`)
    GET  /v1/config                     the served model's limits (sizes, steps, samplers)
    GET  /healthz                       this process is up
    GET  /readyz                        Triton is ready and both models are loaded (else 503)
    GET  /                              the web page; /docs: OpenAPI (served offline)

Every Triton call is a blocking `server.client.Txt2ImgClient` call made on a thread pool, so
concurrent HTTP requests reach Triton concurrently and its dynamic batcher merges their UNet
steps. Errors keep OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: a value
outside the model's limits is a 400 carrying Triton's message, Triton unreachable a 503, any
other Triton failure a 502; the gateway itself keeps serving.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.background import BackgroundTask

from server.auth import KeyChecker
from server.client import (
    StreamProgress,
    Txt2ImgClient,
    Txt2ImgError,
    Txt2ImgOutput,
    grpc_client,
)
from server.limits import INPUTS, InvalidRequest, Limits, parse_request
from server.schemas import (
    INPUT_FIELDS,
    ErrorResponse,
    Health,
    ImageData,
    ImageGenerationRequest,
    ImageGenerationResponse,
    StreamRequest,
)

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass(frozen=True)
class GatewaySettings:
    triton_url: str = "localhost:8001"  # Triton's gRPC address
    model: str = "ldm_txt2img"
    stream_model: str = "ldm_txt2img_stream"
    api_keys: frozenset[str] = frozenset()  # empty: no key needed
    timeout: float = 600.0  # seconds one Triton request may take
    workers: int = 32  # threads making blocking Triton calls (a stream holds one throughout)
    probe_timeout: float = 2.0  # seconds for readiness and config look-ups
    config_ttl: float = 30.0  # seconds the model's limits are cached


class GatewayError(Exception):
    """An HTTP error with an OpenAI-style body."""

    def __init__(self, status: int, message: str, type_: str = "server_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def _param_of(message: str) -> str | None:
    """The request field a Triton message is about ("num_images must be ..." -> "n")."""
    for name, field in INPUT_FIELDS.items():
        if re.search(rf"\b{name}\b", message):
            return field
    return None


def triton_error(e: Exception, url: str) -> GatewayError:
    """The HTTP error for a failed Triton call (Txt2ImgError or tritonclient's exception)."""
    if not isinstance(e, Txt2ImgError):
        e = Txt2ImgError.wrap(e)
    message, status = str(e), e.status or ""
    if e.invalid_argument:
        return GatewayError(400, message, "invalid_request_error", _param_of(message),
                            "invalid_argument")
    if status.endswith(("UNAVAILABLE", "NOT_FOUND")) or status in ("503", "404"):
        return GatewayError(503, f"Triton at {url} is unavailable: {message}",
                            "service_unavailable", code="triton_unavailable")
    if status.endswith("DEADLINE_EXCEEDED"):
        return GatewayError(504, f"Triton did not answer in time: {message}", code="timeout")
    return GatewayError(502, f"Triton failed: {message}", code="triton_error")


def png_b64(image: np.ndarray) -> str:
    """(H, W, 3) uint8 -> base64 of its PNG file."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def response_body(out: Txt2ImgOutput) -> dict:
    n, h, w, _ = out.images.shape
    return ImageGenerationResponse(
        created=int(time.time()), data=[ImageData(b64_json=png_b64(im)) for im in out.images],
        seed=out.used_seed, size=f"{w}x{h}", warnings=out.warnings).model_dump()


def sse(event: str, data: dict) -> bytes:
    """One server-sent event (JSON data on a single line)."""
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def check_request(body: ImageGenerationRequest, limits: Limits | None = None) -> None:
    """Refuse what the gateway cannot serve; with `limits`, what Triton would refuse too
    (the same `parse_request`, hence the same message)."""
    if body.response_format != "b64_json":
        raise GatewayError(400, f"response_format {body.response_format!r} is not supported: "
                           "this server returns the images inline; use 'b64_json'",
                           "invalid_request_error", "response_format", "unsupported_value")
    if limits is None:
        return
    values = {"prompt": body.prompt}
    aliases = {"steps": "num_inference_steps"}
    for k, v in body.triton_params().items():
        if v is not None:
            values[aliases.get(k, k)] = v
    arrays = {k: np.array([v], dtype=object if INPUTS[k][0] == "TYPE_STRING" else None)
              for k, v in values.items()}
    try:
        parse_request(arrays, limits)
    except InvalidRequest as e:
        raise GatewayError(400, str(e), "invalid_request_error", _param_of(str(e)),
                           "invalid_argument") from None


_END = object()  # the stream worker is done


class TritonBackend:
    """The blocking Triton calls, and the thread pool they run on."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.url = settings.triton_url
        self.client = Txt2ImgClient(settings.triton_url, model=settings.model,
                                    stream_model=settings.stream_model,
                                    timeout=settings.timeout)
        self.probe = grpc_client(settings.triton_url)
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="triton")
        self._limits: tuple[float, Limits] | None = None
        self._lock = threading.Lock()

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.client.close()
        self.probe.close()

    def readiness(self) -> str | None:
        """None when Triton and both models are ready, else why not."""
        t = self.settings.probe_timeout
        try:
            if not self.probe.is_server_ready(client_timeout=t):
                return f"Triton at {self.url} is not ready"
            for m in (self.settings.model, self.settings.stream_model):
                if not self.probe.is_model_ready(m, client_timeout=t):
                    return f"model {m} is not loaded"
        except Exception as e:  # noqa: BLE001 - any failure means "not ready"
            return f"Triton at {self.url} is unreachable: {Txt2ImgError.wrap(e)}"
        return None

    def limits(self) -> Limits:
        """The served model's limits, from its config.pbtxt parameters (cached a while)."""
        with self._lock:
            if self._limits is not None and time.monotonic() < self._limits[0]:
                return self._limits[1]
        try:
            cfg = self.probe.get_model_config(self.settings.model, as_json=True,
                                              client_timeout=self.settings.probe_timeout)
        except Exception as e:  # noqa: BLE001
            raise triton_error(e, self.url) from e
        params = {k: v["string_value"]
                  for k, v in cfg["config"].get("parameters", {}).items()}
        limits = Limits.from_parameters(params)
        with self._lock:
            self._limits = (time.monotonic() + self.settings.config_ttl, limits)
        return limits

    def generate(self, body: ImageGenerationRequest) -> dict:
        t0 = time.perf_counter()
        try:
            out = self.client.generate(body.prompt, **body.triton_params())
        except Txt2ImgError as e:
            raise triton_error(e, self.url) from e
        log.info("%d image(s) of %r in %.2f s (seed %d)", len(out.images), body.prompt[:60],
                 time.perf_counter() - t0, out.used_seed)
        return response_body(out)

    def stream(self, body: StreamRequest, put: Callable[[object], None],
               cancelled: threading.Event) -> None:
        """Run one Triton stream, `put`ting SSE bytes, a GatewayError, then _END.

        Stops (and cancels the Triton request) at the next event once `cancelled` is set.
        """
        events = self.client.iter_stream(body.prompt, **body.triton_params())
        try:
            for event in events:
                if cancelled.is_set():
                    log.info("client went away: stream cancelled")
                    return
                if isinstance(event, Txt2ImgOutput):
                    put(sse("result", response_body(event)))
                    return
                put(sse("progress", progress_body(event, body.preview)))
        except Exception as e:  # noqa: BLE001 - becomes an `error` event
            put(triton_error(e, self.url))
        finally:
            events.close()  # before the end: cancels the request on the server
            put(_END)


def progress_body(event: StreamProgress, preview: bool) -> dict:
    previews = []
    if preview and event.preview is not None:
        previews = [png_b64(p) for p in event.preview]
    return {"step": event.step, "total": event.total, "previews": previews}


async def _sse_stream(first, queue: asyncio.Queue, cancelled: threading.Event):
    try:
        item = first
        while item is not _END:
            if isinstance(item, GatewayError):
                yield sse("error", item.body())
                return
            yield item
            item = await queue.get()
    finally:  # also when the client disconnects (the response task is cancelled)
        cancelled.set()


# Module level: with postponed annotations FastAPI resolves `Depends(BEARER)` in the globals.
BEARER = HTTPBearer(auto_error=False, description="an API key, when the server has some")


def _auth_dependency(checker: KeyChecker):
    async def require_key(
            creds: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        if not checker.enabled:
            return
        challenge = {"WWW-Authenticate": "Bearer"}
        if creds is None or not creds.credentials:
            raise GatewayError(401, "missing API key: send the header "
                               "'Authorization: Bearer <key>'", "authentication_error",
                               code="missing_api_key", headers=challenge)
        if not checker.check(creds.credentials):
            raise GatewayError(401, "invalid API key", "authentication_error",
                               code="invalid_api_key", headers=challenge)

    return require_key


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 422, 502, 503)}


def create_app(settings: GatewaySettings = GatewaySettings()) -> FastAPI:
    """The gateway app; one TritonBackend per app, opened at start-up, closed at shutdown."""
    from fastapi_offline import FastAPIOffline

    state: dict[str, TritonBackend] = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["backend"] = TritonBackend(settings)
        log.info("gateway for Triton at %s (API keys %s)", settings.triton_url,
                 "required" if settings.api_keys else "off")
        try:
            yield
        finally:
            state.pop("backend").close()

    def backend() -> TritonBackend:
        return state["backend"]

    app = FastAPIOffline(
        title="Latent diffusion text-to-image", version="0.1.0", lifespan=lifespan,
        description="Images from text with a latent diffusion model served by Triton. "
                    "OpenAI-style `POST /v1/images/generations`, plus progress events.")
    app.state.settings = settings
    require_key = _auth_dependency(KeyChecker(settings.api_keys))

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        parts, param = [], None
        for err in errors:
            loc = [str(p) for p in err.get("loc", ()) if p != "body"]
            param = param or (loc[0] if loc else None)
            parts.append(f"{'.'.join(loc) or 'body'}: {err.get('msg')}")
        body = GatewayError(422, "; ".join(parts), "invalid_request_error", param).body()
        return JSONResponse({**body, "detail": jsonable_encoder(errors)}, status_code=422)

    @app.post("/v1/images/generations", response_model=ImageGenerationResponse,
              responses=ERRORS, dependencies=[Depends(require_key)], tags=["images"])
    async def generations(body: ImageGenerationRequest) -> dict:
        """Generate `n` images for `prompt` (PNG, base64)."""
        check_request(body)
        return await backend().run(backend().generate, body)

    @app.post("/v1/images/generations/stream", responses={
        **ERRORS, 200: {"content": {"text/event-stream": {}},
                        "description": "`progress` events {step, total, previews}, then "
                                       "`result` (the response of /v1/images/generations) or "
                                       "`error`"}},
        dependencies=[Depends(require_key)], tags=["images"])
    async def generations_stream(body: StreamRequest) -> StreamingResponse:
        """Like /v1/images/generations, as server-sent events with progress and previews.

        Closing the connection cancels the generation on the server.
        """
        be = backend()
        check_request(body, await be.run(be.limits))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the loop is gone: the gateway is shutting down
                cancelled.set()

        be.executor.submit(be.stream, body, put, cancelled)
        first = await queue.get()
        if isinstance(first, GatewayError):  # nothing sent yet: a plain HTTP error
            cancelled.set()
            raise first
        return StreamingResponse(_sse_stream(first, queue, cancelled),
                                 media_type="text/event-stream", headers=SSE_HEADERS,
                                 background=BackgroundTask(cancelled.set))

    @app.get("/v1/config", dependencies=[Depends(require_key)], tags=["images"],
             responses=ERRORS)
    async def config() -> dict:
        """The served model's limits: sizes, steps, images per request, samplers, defaults."""
        limits = await backend().run(backend().limits)
        return {"model": settings.model, "limits": asdict(limits)}

    @app.get("/healthz", response_model=Health, response_model_exclude_none=True,
             tags=["health"])
    async def healthz() -> dict:
        """The gateway process is up (says nothing about Triton)."""
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, response_model_exclude_none=True,
             tags=["health"], responses={503: {"model": Health}})
    async def readyz():
        """Triton is ready and both models are loaded; 503 otherwise."""
        reason = await backend().run(backend().readiness)
        if reason is not None:
            return JSONResponse({"status": "unavailable", "detail": reason}, status_code=503)
        return {"status": "ready"}

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


class GatewayThread:
    """uvicorn serving `app` from a daemon thread; signals stay with the main thread."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8080,
                 log_level: str = "info", graceful_timeout: float = 5.0):
        import uvicorn

        self.host, self.port = host, port
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                log_config=None, timeout_graceful_shutdown=graceful_timeout)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout: float = 30.0) -> GatewayThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the gateway could not start on {self.host}:{self.port} "
                                   "(port in use?)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gateway did not start in {timeout:.0f} s")
            time.sleep(0.05)
        return self

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def stop(self, timeout: float = 15.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(5)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m server.gateway",
                                description="Serve the HTTP gateway for a running Triton.")
    p.add_argument("--triton-url", default="localhost:8001", help="Triton's gRPC address")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-keys-file", type=Path,
                   help="one API key per line (also: env LDM_API_KEYS, comma-separated)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per Triton request")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from server.auth import load_api_keys

    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = GatewaySettings(triton_url=args.triton_url, timeout=args.timeout,
                               api_keys=load_api_keys(args.api_keys_file))
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
