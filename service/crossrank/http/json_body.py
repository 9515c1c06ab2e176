"""Strict JSON request bodies: what RFC 8259 allows and nothing else.

Python's ``json`` module, which FastAPI reads bodies with, accepts ``NaN`` and ``Infinity``,
keeps the last of duplicate keys, and a body nested thousands deep exhausts its recursion. Here
each of those, invalid UTF-8, and a body sent as another content type is a 422 naming the body.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from crossrank.core.errors import invalid


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key!r}")
            seen.add(key)
    return obj


def _constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads(body: bytes) -> Any:
    """Parse ``body``; every refusal is a :class:`json.JSONDecodeError` (FastAPI's 422)."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise json.JSONDecodeError("invalid UTF-8", "", exc.start) from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=_constant)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except ValueError as exc:  # the hooks' refusals; an integer of over 4,300 digits
        raise json.JSONDecodeError(str(exc), "", 0) from None


def media_type(content_type: str) -> str:
    """``application/json; charset=utf-8`` -> ``application/json``."""
    return content_type.split(";")[0].strip()


def is_json(content_type: str) -> bool:
    """Whether a ``Content-Type`` says the body is JSON (the only body the routes take)."""
    return media_type(content_type).lower() == "application/json"


class StrictJSONRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            self._json = loads(await self.body())
        return self._json


class StrictJSONRoute(APIRoute):
    """A route whose JSON body is read by :func:`loads`, and that takes JSON only."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        takes_body = self.body_field is not None

        async def strict(request: Request) -> Response:
            content_type = request.headers.get("content-type", "")
            if takes_body and not is_json(content_type):
                sent = media_type(content_type) or "no content type"
                raise invalid(
                    f"the body must be JSON sent as Content-Type: application/json, not {sent!r}",
                    "body",
                )
            return await handler(StrictJSONRequest(request.scope, request.receive))

        return strict
