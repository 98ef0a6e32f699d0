"""The gateway's side of Triton: `TritonBackend` makes the calls (a plain request is one
cancellable gRPC `async_infer`, a stream a blocking `Txt2ImgClient` stream on a thread pool,
readiness and limits are cached probes), and the helpers here turn their results into HTTP
bodies: PNGs in base64, and server-sent events for a stream. Kept apart from the app so that
the routes stay short and say only what each endpoint answers.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fastapi.responses import StreamingResponse
from starlette.background import BackgroundTask

from server.client import (
    OUTPUTS,
    StreamProgress,
    Txt2ImgClient,
    Txt2ImgError,
    Txt2ImgOutput,
    build_inputs,
    grpc_client,
    output_from_result,
)
from server.contract import Limits, config_parameters, pipeline_names, served_name
from server.errors import GatewayError, triton_error
from server.schemas import ImageData, ImageGenerationRequest, ImageGenerationResponse, StreamRequest

if TYPE_CHECKING:
    from server.gateway import GatewaySettings

# The gateway's logger: log settings (and tests) select the gateway's records by this name.
log = logging.getLogger("server.gateway")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


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


_END = object()  # the stream worker is done


@dataclass(frozen=True)
class ServedModel:
    """A model Triton serves, as the API names it: `name` (the `model` field's value), its
    front and streaming pipeline models, and its limits (their config.pbtxt parameters)."""

    name: str
    model: str
    stream_model: str
    limits: Limits


class TritonBackend:
    """The blocking Triton calls, and the thread pool they run on. The models are found in
    Triton's repository index: every ready `<name>_txt2img` with its `<name>_txt2img_stream`
    (server.contract.pipeline_names); `settings.model`'s is the default."""

    def __init__(self, settings: GatewaySettings):
        self.settings = settings
        self.url = settings.triton_url
        self.default = served_name(settings.model) or settings.model
        self.grpc = grpc_client(settings.triton_url)  # probes and plain (cancellable) requests
        self.executor = ThreadPoolExecutor(settings.workers, thread_name_prefix="triton")
        self._catalog: tuple[float, dict[str, ServedModel]] | None = None
        self._clients: dict[str, Txt2ImgClient] = {}  # stream clients, per served model
        self._lock = threading.Lock()

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        for client in self._clients.values():
            client.close()
        self.grpc.close()

    def client(self, served: ServedModel) -> Txt2ImgClient:
        with self._lock:
            if served.name not in self._clients:
                self._clients[served.name] = Txt2ImgClient(
                    self.settings.triton_url, model=served.model,
                    stream_model=served.stream_model, timeout=self.settings.timeout)
            return self._clients[served.name]

    def readiness(self) -> str | None:
        """None when Triton and both models are ready, else why not."""
        t = self.settings.probe_timeout
        try:
            if not self.grpc.is_server_ready(client_timeout=t):
                return f"Triton at {self.url} is not ready"
            for m in (self.settings.model, self.settings.stream_model):
                if not self.grpc.is_model_ready(m, client_timeout=t):
                    return f"model {m} is not loaded"
        except Exception as e:  # noqa: BLE001 - any failure means "not ready"
            return f"Triton at {self.url} is unreachable: {Txt2ImgError.wrap(e)}"
        return None

    def catalog(self) -> dict[str, ServedModel]:
        """{name: ServedModel} of the ready pipelines, the default first (cached a while)."""
        with self._lock:
            if self._catalog is not None and time.monotonic() < self._catalog[0]:
                return self._catalog[1]
        t = self.settings.probe_timeout
        try:
            index = self.grpc.get_model_repository_index(as_json=True, client_timeout=t)
            ready = {m["name"] for m in index.get("models", []) if m.get("state") == "READY"}
            names = sorted({served_name(m) for m in ready if served_name(m)},
                           key=lambda n: (n != self.default, n))
            found = {}
            for name in names:
                front, stream = pipeline_names(name)
                if front in ready and stream in ready:
                    cfg = self.grpc.get_model_config(front, as_json=True, client_timeout=t)
                    limits = Limits.from_parameters(config_parameters(cfg["config"]))
                    found[name] = ServedModel(name, front, stream, limits)
        except Exception as e:  # noqa: BLE001
            raise triton_error(e, self.url) from e
        with self._lock:
            self._catalog = (time.monotonic() + self.settings.config_ttl, found)
        return found

    def resolve(self, name: str | None) -> ServedModel:
        """The served model `name` picks (None: the default); 404 naming those served."""
        catalog = self.catalog()
        served = catalog.get(self.default if name is None else name)
        if served is None:
            listed = ", ".join(catalog) or "none (is Triton still loading?)"
            what = f"model {name!r} is not served" if name else "the default model is not served"
            raise GatewayError(404, f"{what}; models: {listed}", "invalid_request_error",
                               "model", "model_not_found")
        return served

    def limits(self, name: str | None = None) -> Limits:
        """The limits of the served model `name` (None: the default)."""
        return self.resolve(name).limits

    async def generate(self, body: ImageGenerationRequest) -> dict:
        """The response body for `body`, from one `async_infer` call. Cancelling the task
        awaiting this cancels the gRPC call, and with it the request in Triton (the model
        polls `is_cancelled()` before every UNet call)."""
        import tritonclient.grpc as grpcclient

        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def on_done(result, error) -> None:  # on a gRPC thread
            with suppress(RuntimeError):  # the loop is gone: the gateway is shutting down
                loop.call_soon_threadsafe(_settle, done, (result, error))

        served = await self.run(self.resolve, body.model)
        t0 = time.perf_counter()
        inputs = build_inputs(grpcclient, body.to_request())
        call = self.grpc.async_infer(
            served.model, inputs, on_done,
            outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS],
            client_timeout=self.settings.timeout)
        try:
            result, error = await done
        except asyncio.CancelledError:
            call.cancel()
            log.info("client went away: generation cancelled")
            raise
        if error is not None:
            raise triton_error(error, self.url)
        out = output_from_result(result)
        log.info("%d image(s) of %r from %s in %.2f s (seed %d)", len(out.images),
                 body.prompt[:60], served.name, time.perf_counter() - t0, out.used_seed)
        return await self.run(response_body, out)  # PNG encoding: off the event loop

    def stream(self, body: StreamRequest, put: Callable[[object], None],
               cancelled: threading.Event) -> None:
        """Run one Triton stream, `put`ting SSE bytes, a GatewayError, then _END.

        Stops (and cancels the Triton request) at the next event once `cancelled` is set.
        """
        try:
            events = self.client(self.resolve(body.model)).iter_stream(body.to_request())
        except Exception as e:  # noqa: BLE001 - an unknown model, Triton away: an HTTP error
            put(e if isinstance(e, GatewayError) else triton_error(e, self.url))
            put(_END)
            return
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


def _settle(future: asyncio.Future, value) -> None:
    if not future.done():  # not cancelled meanwhile
        future.set_result(value)


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


async def stream_response(backend: TritonBackend, body: StreamRequest) -> StreamingResponse:
    """Start `backend.stream` on its thread pool: the SSE response once its first event is
    there, or its GatewayError raised (nothing sent yet: a plain HTTP error)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    cancelled = threading.Event()

    def put(item) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop is gone: the gateway is shutting down
            cancelled.set()

    backend.executor.submit(backend.stream, body, put, cancelled)
    first = await queue.get()
    if isinstance(first, GatewayError):  # nothing sent yet: a plain HTTP error
        cancelled.set()
        raise first
    return StreamingResponse(_sse_stream(first, queue, cancelled),
                             media_type="text/event-stream", headers=SSE_HEADERS,
                             background=BackgroundTask(cancelled.set))
