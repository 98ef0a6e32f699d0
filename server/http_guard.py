"""What the gateway decides below the app, before FastAPI sees a request: the pure-ASGI
`RequestGuard` checks a request's API key (401), body size (413) and the time its body takes to
arrive (408) before the body is read; `header_timeout_protocol` and `uvicorn_options` give
uvicorn limits on request heads and idle connections, which uvicorn parses before any app; and
`RedactQuerySecrets` keeps key-like query values out of uvicorn's access log. A slow, oversized
or unauthorised request is thus refused before it costs memory or a worker's time.
"""
from __future__ import annotations

import asyncio
import logging
import re
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

from starlette.datastructures import Headers

from server.auth import KeyChecker
from server.errors import ClientGone, GatewayError

if TYPE_CHECKING:
    from server.gateway import GatewaySettings

# The gateway's logger: log settings (and tests) select the gateway's records by this name.
log = logging.getLogger("server.gateway")

KEY_PREFIX = "/v1/"  # the routes that need an API key (when the server has some)


def key_error(checker: KeyChecker, authorization: str | None) -> GatewayError | None:
    """The 401 for a request with this `Authorization` header, or None to let it in."""
    refusal = checker.refusal(authorization)
    if refusal is None:
        return None
    code, message = refusal
    return GatewayError(401, message, "authentication_error", code=code,
                        headers={"WWW-Authenticate": "Bearer"})


class RequestGuard:
    """Pure ASGI middleware: what is decided before the app reads a request's body.

    1. the API key, from the headers (401), for paths under KEY_PREFIX; 2. the body's size:
    by Content-Length when sent, else counted as chunks arrive (413 at the limit); 3. the time
    the body takes to arrive (408). A refusal with the body unread closes the connection, so
    uvicorn does not drain what is left of it. The body (at most `max_body_bytes`, which
    FastAPI would hold in memory anyway) goes on to the app in one message.
    """

    def __init__(self, app, settings: GatewaySettings):
        self.app, self.settings = app, settings
        self.checker = KeyChecker(settings.api_keys)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        has_body = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
        error = self._check_head(scope["path"], headers)
        if error is not None:
            await error.response(close=has_body)(scope, receive, send)
            return
        try:
            body = await self._read_body(receive)
        except GatewayError as e:
            await e.response(close=True)(scope, receive, send)
            return
        except ClientGone:
            return
        await self.app(scope, _replay(body, receive), send)

    def _check_head(self, path: str, headers: Headers) -> GatewayError | None:
        if path.startswith(KEY_PREFIX):
            error = key_error(self.checker, headers.get("authorization"))
            if error is not None:
                return error
        length = headers.get("content-length")  # h11 has checked it is a number
        if length is not None and int(length) > self.settings.max_body_bytes:
            return self._too_large()
        return None

    async def _read_body(self, receive) -> bytes:
        chunks, size, more = [], 0, True
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                while more:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone
                    chunks.append(message.get("body", b""))
                    size += len(chunks[-1])
                    if size > self.settings.max_body_bytes:  # a chunked body, or a lie
                        raise self._too_large()
                    more = message.get("more_body", False)
        except TimeoutError:
            raise GatewayError(408, "the request body did not arrive within "
                               f"{self.settings.body_timeout:g} s", "invalid_request_error",
                               code="request_timeout") from None
        return b"".join(chunks)

    def _too_large(self) -> GatewayError:
        return GatewayError(413, f"the request body is larger than "
                            f"{self.settings.max_body_bytes} bytes", "invalid_request_error",
                            code="request_too_large")


def _replay(body: bytes, receive):
    """A `receive` that gives `body` in one message, then what the client sends next (only a
    disconnect: the SSE response and `unless_disconnected` listen for it)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replayed():
        return pending.pop() if pending else await receive()

    return replayed


def uvicorn_options(settings: GatewaySettings) -> dict:
    """uvicorn's limits on connections and request heads (uvicorn parses those, not the app)."""
    return {"http": header_timeout_protocol(settings.header_timeout),
            "h11_max_incomplete_event_size": settings.max_header_bytes,
            "timeout_keep_alive": settings.keep_alive_timeout}


def header_timeout_protocol(timeout: float) -> type:
    """uvicorn's h11 protocol, closing a connection whose request line and headers have not all
    arrived `timeout` seconds after it opened (or after the previous response).

    uvicorn has no such limit: its keep-alive timer stops at the first byte received, so a
    client sending its headers a byte at a time would hold a connection for as long as it likes.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()  # first: a pipelined request may start in there, and disarm it
            super().on_response_complete()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a request's head has arrived
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._head_timer = self.loop.call_later(timeout, self._head_timed_out)

        def _disarm(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            if not self.transport.is_closing():
                log.info("closed a connection: no complete request head in %g s", timeout)
                self.transport.close()

    return HeaderTimeoutProtocol


# Query parameters whose values are secrets (`?api_key=...` is refused, but uvicorn's access
# log would still print it).
_SECRET_PARAM = re.compile(r"key|token|secret|passw|auth|signature|credential", re.IGNORECASE)


def redact_query(target: str) -> str:
    """A request target with the values of key-like query parameters replaced."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    pairs = []
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        pairs.append(f"{name}=REDACTED" if eq and _SECRET_PARAM.search(unquote_plus(name))
                     else pair)
    return f"{path}?{'&'.join(pairs)}"


class RedactQuerySecrets(logging.Filter):
    """For "uvicorn.access": its record's arguments hold the request target."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) and "?" in a else a
                                for a in record.args)
        return True


def install_access_log_filter() -> None:
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactQuerySecrets) for f in access.filters):
        access.addFilter(RedactQuerySecrets())
