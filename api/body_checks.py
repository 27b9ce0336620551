"""What every JSON body must be before a route reads it: valid Unicode (``api.unicode_bodies``)
and nested no deeper than ``MAX_BODY_DEPTH``.

Deeply nested JSON (a tool's ``parameters``, a schema's ``examples``) passed the request models
and failed later: a 500 where the front writes it out again (pydantic stops serializing at a
depth), or a job its worker could not read back (pydantic's JSON reader stops at 200 levels),
which RQ then failed as lost. So the bound is checked on the body as sent, once, with the place
it is passed. A body with fewer brackets than the bound cannot pass it and is not looked at.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from api.errors import ApiError
from api.unicode_bodies import refuse_lone_surrogates

# JSON nesting a body may have: a JSON Schema nested as deep as a request may hold one
# (json_schema_check's 64 schemas, each an object in its parent's "properties") fits, and the
# job's stored form (the tools inside a structural tag: a few levels more) stays well under the
# 200 levels a worker reads.
MAX_BODY_DEPTH = 160
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # unrolled: fast on long strings
_BRACKET = re.compile(rb"[\[\]{}]")
SHOWN_STEPS = 4  # of the path to the place past the bound, in the error


def too_deep(body: bytes, limit: int = MAX_BODY_DEPTH) -> bool:
    """Whether the JSON text ``body`` nests arrays and objects more than ``limit`` deep (brackets
    inside strings do not count)."""
    if body.count(b"{") + body.count(b"[") <= limit:
        return False
    depth = 0
    for bracket in _BRACKET.finditer(_STRING.sub(b'""', body)):
        depth += 1 if bracket[0] in (b"{", b"[") else -1
        if depth > limit:
            return True
    return False


def deep_place(value: Any, limit: int = MAX_BODY_DEPTH) -> str:
    """The dotted path to where a parsed JSON value passes ``limit`` levels, its first steps
    only. Linear: each container keeps its parent's place, and one path is made, at the end."""
    places: list[tuple[int, str]] = [(-1, "")]  # (parent's place, own key) per container
    pending: list[tuple[Any, int, int]] = [(value, 0, 0)]  # (container, its place, its depth)
    while pending:
        node, place, depth = pending.pop()
        if depth >= limit:
            steps: list[str] = []
            while place > 0:
                place, step = places[place]
                steps.append(step)
            return ".".join(reversed(steps[-SHOWN_STEPS:]))
        items: Any = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(item, dict | list):
                places.append((place, str(key)))
                pending.append((item, len(places) - 1, depth + 1))
    return ""


def refuse_deep_nesting(body: bytes) -> None:
    """ApiError (400) naming where a JSON body nests deeper than ``MAX_BODY_DEPTH``."""
    if not too_deep(body):
        return
    try:
        place = deep_place(json.loads(body))
    except RecursionError:  # past what Python's JSON reader takes: no place to name
        place = ""
    except ValueError:  # not JSON at all (an unterminated string, say): the route's invalid_json
        return
    where = f"'{place}'" if place else "the body"
    raise ApiError(
        400,
        f"{where} is nested more than {MAX_BODY_DEPTH} levels deep (arrays and objects)",
        param=place or None,
        code="too_deep",
    )


class CheckedBodyRoute(APIRoute):
    """A route whose JSON body is refused (400) when it holds a lone surrogate anywhere, or nests
    deeper than ``MAX_BODY_DEPTH``."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                await refuse_lone_surrogates(request)
                try:
                    body = await request.body()
                except Exception:  # the client went away mid-body: the route meets it as it always did
                    body = b""
                refuse_deep_nesting(body)
            return await handler(request)

        return checked
