"""A JSON body must hold valid Unicode text only: a lone surrogate (``"\\ud800"``, which JSON
can escape and Python's JSON reader takes) is a 400 naming where it is, before a route runs.

The request models check the text fields a job is made of (``shared.schemas.Text``), but a lone
surrogate anywhere else (a metadata key, a JSON Schema's description, a ``user``) passed them
and failed later, where text is encoded: a 500, sometimes after the job was created. So every
route that takes a body checks all of it here once (``UnicodeCheckedRoute``, the routers' route
class). A body without a ``\\uD800``-``\\uDFFF`` escape cannot hold one, and is not read twice.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute

from api.errors import ApiError

_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _valid(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def lone_surrogate(value: Any, path: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """(where, what) of the first text in a parsed JSON value that is not valid Unicode: its
    dotted path (``metadata.k``, ``tools.0.function.parameters``), and whether it is a value or
    a key there; None if all of it is valid."""
    pending: list[tuple[Any, tuple[str, ...]]] = [(value, path)]  # depth first, in document order
    while pending:
        node, at = pending.pop()
        if isinstance(node, str):
            if not _valid(node):
                return ".".join(at), "text"
        elif isinstance(node, dict):
            if not all(_valid(key) for key in node):
                return ".".join(at), "a key"
            pending.extend((item, (*at, key)) for key, item in reversed(node.items()))
        elif isinstance(node, list):
            pending.extend((node[n], (*at, str(n))) for n in range(len(node) - 1, -1, -1))
    return None


async def refuse_lone_surrogates(request: Request) -> None:
    """ApiError (400) when the request's JSON body holds a lone surrogate. A body that is not
    JSON is left to the route (its own 4xx)."""
    body = await request.body()
    if not _SURROGATE_ESCAPE.search(body):
        return
    try:
        parsed = json.loads(body)
    except ValueError:
        return
    found = lone_surrogate(parsed)
    if found is None:
        return
    where, what = found
    place = f"'{where}'" if where else "the body"
    raise ApiError(
        400,
        f"{what} in {place} is not valid Unicode: it holds a lone surrogate (a \\uD800-\\uDFFF escape "
        "that is not half of a pair)",
        param=where or None,
        code="invalid_unicode",
    )


class UnicodeCheckedRoute(APIRoute):
    """A route whose JSON body is refused (400) when it holds a lone surrogate anywhere."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            if request.method in ("POST", "PUT", "PATCH"):
                await refuse_lone_surrogates(request)
            return await handler(request)

        return checked
