"""The gateway's errors, all in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`:
`GatewayError` and the functions that turn FastAPI's, Starlette's and Triton's failures into
one (a value outside the model's limits is a 400 carrying Triton's message, a wrong type or
bound a 422, Triton unreachable a 503, any other Triton failure a 502). They live apart from the
app so that the ASGI guard, the Triton backend and the routes all answer in the same shape.
"""
from __future__ import annotations

import re
from collections.abc import Sequence

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.client import Txt2ImgError
from server.schemas import INPUT_FIELDS

MAX_REPORTED_ERRORS = 10  # of pydantic's, in one message (an object of 10,000 unknown fields)
HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


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
        param = None if self.param is None else printable(self.param, 100)
        return {"error": {"message": printable(self.message, 2000), "type": self.type,
                          "param": param, "code": self.code}}

    def response(self, close: bool = False) -> JSONResponse:
        """The JSON answer; `close`: end the connection after it (a body was left unread)."""
        headers = dict(self.headers or {})
        if close:
            headers["Connection"] = "close"
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def printable(text: str, limit: int) -> str:
    """`text` fit to go back in a JSON answer: at most `limit` characters, and no lone
    surrogates ("\\ud800" from a client's JSON), which the UTF-8 encoder refuses (a 500)."""
    if len(text) > limit:
        text = text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def validation_error(errors: Sequence[dict]) -> GatewayError:
    """The answer to FastAPI's/pydantic's errors: 400 for a body that is not JSON, else 422.

    Their `input` is left out: it is whatever the client sent (NaN, a megabyte string).
    """
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "JSON decode error")
            return GatewayError(400, f"the body is not valid JSON: {reason}",
                                "invalid_request_error", code="invalid_json")
    parts, param = [], None
    for err in errors[:MAX_REPORTED_ERRORS]:
        loc = [printable(str(p), 100) for p in err.get("loc", ()) if p != "body"]
        param = param or (loc[0] if loc else None)
        parts.append(f"{'.'.join(loc) or 'body'}: {printable(str(err.get('msg')), 300)}")
    if len(errors) > MAX_REPORTED_ERRORS:
        parts.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more")
    return GatewayError(422, "; ".join(parts), "invalid_request_error", param)


def http_error(exc: StarletteHTTPException) -> GatewayError:
    """Starlette's and FastAPI's own errors (404, 405, an unparsable body) in our shape."""
    kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return GatewayError(exc.status_code, str(exc.detail), kind,
                        code=HTTP_CODES.get(exc.status_code), headers=exc.headers)


def _param_of(message: str) -> str | None:
    """The request field a Triton message is about ("num_images must be ..." -> "n")."""
    for name, field in INPUT_FIELDS.items():
        if re.search(rf"\b{name}\b", message):
            return field
    return None


def invalid_argument(message: str) -> GatewayError:
    """The 400 for a value outside the model's limits (`parse_request`'s message, Triton's)."""
    return GatewayError(400, message, "invalid_request_error", _param_of(message),
                        "invalid_argument")


def triton_error(e: Exception, url: str) -> GatewayError:
    """The HTTP error for a failed Triton call (Txt2ImgError or tritonclient's exception)."""
    if not isinstance(e, Txt2ImgError):
        e = Txt2ImgError.wrap(e)
    message, status = str(e), e.status or ""
    if e.invalid_argument:
        return invalid_argument(message)
    if status.endswith(("UNAVAILABLE", "NOT_FOUND")) or status in ("503", "404"):
        return GatewayError(503, f"Triton at {url} is unavailable: {message}",
                            "service_unavailable", code="triton_unavailable")
    if status.endswith("DEADLINE_EXCEEDED"):
        return GatewayError(504, f"Triton did not answer in time: {message}", code="timeout")
    return GatewayError(502, f"Triton failed: {message}", code="triton_error")
