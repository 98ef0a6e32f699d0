"""Strict JSON for request bodies: `strict_json` takes RFC 8259 JSON only, and `StrictJSONRoute`
makes a FastAPI route read its body with it, so that what Python's json.loads lets through (NaN,
Infinity, 1e309, huge integers, lone surrogates, deep nesting, bodies not in UTF-8) is refused
as a 400 where it is parsed, instead of failing later, far from there, as a 500.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

MAX_JSON_DEPTH = 32  # our bodies are flat; Python's parser would recurse ~1000 deep
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def strict_json(raw: bytes) -> Any:
    """RFC 8259 JSON, or json.JSONDecodeError saying what is wrong (a 400: see validation_error).

    Python's json.loads also takes NaN, Infinity, 1e309 (-> inf), "\\ud800" (a str that no
    UTF-8 encoder takes) and UTF-16/32 bodies: values that fail later, far from here (500s).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise json.JSONDecodeError(f"not UTF-8 (byte {e.start})", "", 0) from None
    try:
        value = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_short_int)
        _check_tree(value)
    except json.JSONDecodeError as e:
        raise json.JSONDecodeError(e.msg, "", e.pos) from None
    except RecursionError:
        raise json.JSONDecodeError(f"nested more than {MAX_JSON_DEPTH} levels", "", 0) from None
    except ValueError as e:  # from the hooks below
        raise json.JSONDecodeError(str(e), "", 0) from None
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number (numbers must be finite)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range (numbers must be finite)")
    return value


def _short_int(text: str) -> int:
    if len(text.lstrip("-")) > 30:  # no field takes more than int64; int() would parse 4300
        raise ValueError(f"an integer of {len(text)} digits is out of range")
    return int(text)


def _check_tree(value: Any) -> None:
    """Refuse nesting deeper than MAX_JSON_DEPTH and strings with lone surrogates."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ValueError(f"nested more than {MAX_JSON_DEPTH} levels")
        if isinstance(v, dict):
            stack.extend((k, depth) for k in v)
            stack.extend((x, depth + 1) for x in v.values())
        elif isinstance(v, list):
            stack.extend((x, depth + 1) for x in v)
        elif isinstance(v, str) and _SURROGATE.search(v):
            raise ValueError("a string holds a lone UTF-16 surrogate (e.g. \\ud800): not "
                             "Unicode text")


class StrictJSONRequest(Request):
    """A request whose JSON body is read by `strict_json`."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = strict_json(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route reading its body as StrictJSONRequest (FastAPI's pattern for a custom Request)."""

    def get_route_handler(self) -> Callable[[Request], Awaitable[Response]]:
        handler = super().get_route_handler()

        async def strict(request: Request) -> Response:
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
