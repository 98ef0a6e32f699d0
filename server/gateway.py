"""HTTP gateway in front of Triton: an OpenAI-style images API, progress events, a web page.

    python -m server.gateway --triton-url localhost:8001 --port 8080   # Triton runs elsewhere
    python -m server                                                    # Triton + gateway

Routes (`create_app(settings)`):

    POST /v1/images/generations         {"prompt", "n", "size": "WxH", ...} -> PNGs (base64)
    POST /v1/images/generations/stream  same body -> server-sent events: `progress` per
                                        sampler step, then `result` (or `error`)
    GET  /v1/config[?model=]            a served model's limits (sizes, steps, samplers)
    GET  /v1/models, /v1/models/{id}    the served models (OpenAI's list); `model` in a body
                                        picks one (an unknown one: 404 listing them)
    GET  /healthz                       this process is up
    GET  /readyz                        Triton is ready and both models are loaded (else 503)
    GET  /                              the web page; /docs: OpenAPI (served offline)

A plain request is one gRPC `async_infer` call to Triton, cancelled when its client
disconnects; a stream is a blocking `server.client.Txt2ImgClient` stream on a thread pool,
cancelled the same way. Concurrent HTTP requests reach Triton concurrently and its dynamic
batcher merges their UNet steps. Every error, the gateway's own (404, 405, unreadable JSON)
included, keeps OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: a value
outside the model's limits is a 400 carrying Triton's message, a wrong type or bound a 422,
Triton unreachable a 503, any other Triton failure a 502; the gateway itself keeps serving.

Before a request's body is read (`RequestGuard`, an ASGI middleware), its API key is checked
(401), its size (413: by Content-Length, else counted as it arrives) and the time it takes to
arrive (408). uvicorn gets limits on the request head (size, time) and on idle connections,
and its access log has the values of key-like query parameters redacted.

This file holds the settings, the routes and the uvicorn thread; the pieces live beside it:
server/errors.py (the error shape), server/strict_json.py (the JSON parser of request bodies),
server/http_guard.py (RequestGuard, uvicorn's limits, the access-log filter) and
server/backend.py (the Triton calls, PNG and SSE bodies). Their public names are exported here
too.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TypeVar

from fastapi import Depends, FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.auth import KeyChecker
from server.backend import (
    SSE_HEADERS,
    TritonBackend,
    png_b64,
    progress_body,
    response_body,
    sse,
    stream_response,
)
from server.contract import InvalidRequest, Limits
from server.errors import (
    HTTP_CODES,
    MAX_REPORTED_ERRORS,
    ClientGone,
    GatewayError,
    http_error,
    invalid_argument,
    printable,
    triton_error,
    validation_error,
)
from server.http_guard import (
    KEY_PREFIX,
    RedactQuerySecrets,
    RequestGuard,
    header_timeout_protocol,
    install_access_log_filter,
    key_error,
    redact_query,
    uvicorn_options,
)
from server.schemas import (
    ErrorResponse,
    Health,
    ImageGenerationRequest,
    ImageGenerationResponse,
    StreamRequest,
)
from server.strict_json import MAX_JSON_DEPTH, StrictJSONRequest, StrictJSONRoute, strict_json

__all__ = [
    "ERRORS", "HTTP_CODES", "KEY_PREFIX", "MAX_JSON_DEPTH", "MAX_REPORTED_ERRORS", "SSE_HEADERS",
    "WEB_DIR", "ClientGone", "GatewayError", "GatewaySettings", "GatewayThread",
    "RedactQuerySecrets", "RequestGuard", "StrictJSONRequest", "StrictJSONRoute",
    "TritonBackend", "check_request", "create_app", "header_timeout_protocol", "http_error",
    "install_access_log_filter", "key_error", "main", "parse_args", "png_b64", "printable",
    "progress_body", "redact_query", "response_body", "sse", "strict_json", "triton_error",
    "unless_disconnected", "uvicorn_options", "validation_error",
]

log = logging.getLogger(__name__)

WEB_DIR = Path(__file__).resolve().parent / "web"


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
    # Slow or oversized requests: a prompt is at most a few kB, so 1 MiB is plenty.
    max_body_bytes: int = 1 << 20  # a larger body is refused (413) before it is read
    body_timeout: float = 30.0  # seconds for a request's whole body to arrive (else 408)
    header_timeout: float = 10.0  # seconds for a request line and headers (else closed)
    max_header_bytes: int = 16 * 1024  # request line + headers (h11's limit; else 400)
    keep_alive_timeout: int = 5  # seconds an idle keep-alive connection stays open


def check_request(body: ImageGenerationRequest, limits: Limits | None = None) -> None:
    """Refuse what the gateway cannot serve; with `limits`, what Triton would refuse too
    (the same `GenerationRequest.resolve`, hence the same message)."""
    if body.response_format != "b64_json":
        raise GatewayError(400, f"response_format {body.response_format!r} is not supported: "
                           "this server returns the images inline; use 'b64_json'",
                           "invalid_request_error", "response_format", "unsupported_value")
    if limits is None:
        return
    try:
        body.to_request().resolve(limits)
    except InvalidRequest as e:
        raise invalid_argument(str(e)) from None


T = TypeVar("T")


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelling it (ClientGone) if the client disconnects first.

    The body is read by then, so the next `receive()` returns only at a disconnect.
    """
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task
        raise ClientGone
    return task.result()


# Module level: with postponed annotations FastAPI resolves `Depends(BEARER)` in the globals.
BEARER = HTTPBearer(auto_error=False, description="an API key, when the server has some")


def _auth_dependency(checker: KeyChecker):
    # RequestGuard has decided already (before the body); this documents the scheme in
    # OpenAPI and keeps a route outside /v1/ that asks for it from being open by mistake.
    async def require_key(
            request: Request,
            _: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> None:
        error = key_error(checker, request.headers.get("authorization"))
        if error is not None:
            raise error

    return require_key


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 404, 408, 413, 422, 502, 503)}


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
    app.router.route_class = StrictJSONRoute  # before the routes: they are made with it
    app.add_middleware(RequestGuard, settings=settings)
    install_access_log_filter()
    require_key = _auth_dependency(KeyChecker(settings.api_keys))
    _add_exception_handlers(app)
    _add_image_routes(app, settings, backend, require_key)
    _add_health_routes(app, backend)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(WEB_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    app.mount("/static", StaticFiles(directory=WEB_DIR), name="static")
    return app


def _add_exception_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape, FastAPI's and Starlette's own included."""

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return http_error(exc).response()

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this: uvicorn logs the traceback and closes the connection.
        return GatewayError(500, "internal error", code="internal_error").response(close=True)


def _add_image_routes(app: FastAPI, settings: GatewaySettings,
                      backend: Callable[[], TritonBackend], require_key: Callable) -> None:
    """POST /v1/images/generations, its /stream variant and GET /v1/config."""

    @app.post("/v1/images/generations", response_model=ImageGenerationResponse,
              responses=ERRORS, dependencies=[Depends(require_key)], tags=["images"])
    async def generations(body: ImageGenerationRequest, request: Request) -> dict:
        """Generate `n` images for `prompt` (PNG, base64).

        Closing the connection cancels the generation on the server.
        """
        check_request(body)
        return await unless_disconnected(request, backend().generate(body))

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
        check_request(body, await be.run(be.limits, body.model))
        return await stream_response(be, body)

    @app.get("/v1/config", dependencies=[Depends(require_key)], tags=["images"],
             responses=ERRORS)
    async def config(model: str | None = None) -> dict:
        """A served model's limits (`?model=`; default: the default model): sizes, steps,
        images per request, samplers, defaults."""
        served = await backend().run(backend().resolve, model)
        return {"model": served.name, "limits": served.limits.model_dump()}

    @app.get("/v1/models", dependencies=[Depends(require_key)], tags=["models"],
             responses=ERRORS)
    async def models() -> dict:
        """The served models, as OpenAI's `GET /v1/models` lists them; the first is the
        default of requests that name none."""
        catalog = await backend().run(backend().catalog)
        return {"object": "list", "data": [model_card(m) for m in catalog.values()]}

    @app.get("/v1/models/{model}", dependencies=[Depends(require_key)], tags=["models"],
             responses=ERRORS)
    async def model_info(model: str) -> dict:
        """One served model, with its limits (404 names the served ones)."""
        served = await backend().run(backend().resolve, model)
        return {**model_card(served), "limits": served.limits.model_dump()}


def model_card(served) -> dict:
    """OpenAI's model object ({id, object, created, owned_by}) of a served model."""
    return {"id": served.name, "object": "model", "created": 0, "owned_by": "ldm-serve"}


def _add_health_routes(app: FastAPI, backend: Callable[[], TritonBackend]) -> None:
    """GET /healthz (this process) and /readyz (Triton and both models)."""

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


class GatewayThread:
    """uvicorn serving `app` from a daemon thread; signals stay with the main thread."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 8080,
                 log_level: str = "info", graceful_timeout: float = 5.0):
        import uvicorn

        self.host, self.port = host, port
        settings = getattr(app.state, "settings", GatewaySettings())
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                log_config=None, timeout_graceful_shutdown=graceful_timeout,
                                **uvicorn_options(settings))
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
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_config=None,
                **uvicorn_options(settings))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
