"""A JSON body must hold valid Unicode text only: a lone surrogate (``"\\ud800"``, which JSON
can escape and Python's JSON reader takes) is a 400 naming where it is, before a route runs.

The request models check the text fields a job is made of (``shared.schemas.Text``), but a lone
surrogate anywhere else (a metadata key, a JSON Schema's description, a ``user``) passed them
and failed later, where text is encoded: a 500, sometimes after the job was created. So every
route that takes a body checks all of it here once (``api.body_checks.CheckedBodyRoute``, the
routers' route class). A UTF-8 body with no ``\\uD800``-``\\uDFFF`` escape and no surrogate's
bytes cannot hold one, and is not parsed twice; one that may is checked whole at C speed, and
walked only when it does, to name where.
"""

from __future__ import annotations

import json
import re
from typing import Any

from fastapi import Request

from api.errors import ApiError
from shared.schemas.messages import valid_unicode

# Where a body may hold a lone surrogate: a \uD800-\uDFFF escape, the 3 bytes UTF-8 would give
# one (which Python's JSON reader takes: it decodes with surrogatepass), or a UTF-16/32 body.
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf]")


def lone_surrogate(value: Any) -> tuple[str, str] | None:
    """(where, what) of the first text in a parsed JSON value that is not valid Unicode: its
    dotted path (``metadata.k``, ``tools.0.function.parameters``), and whether it is a value or
    a key there; None if all of it is valid. Linear in the value's size: each node keeps its
    parent's place, and a path is made for the one node found only."""
    nodes: list[tuple[int, str]] = [(-1, "")]  # (parent's place, own key) per node visited
    pending: list[tuple[Any, int]] = [(value, 0)]  # depth first, in document order
    while pending:
        node, place = pending.pop()
        found = ""
        if isinstance(node, str):
            found = "" if valid_unicode(node) else "text"
        elif isinstance(node, dict):
            if not all(valid_unicode(key) for key in node):
                found = "a key"
            for key, item in reversed(node.items()):
                nodes.append((place, key))
                pending.append((item, len(nodes) - 1))
        elif isinstance(node, list):
            for n in range(len(node) - 1, -1, -1):
                nodes.append((place, str(n)))
                pending.append((node[n], len(nodes) - 1))
        if found:
            path: list[str] = []
            while place > 0:
                place, key = nodes[place]
                path.append(key)
            return ".".join(reversed(path)), found
    return None


async def refuse_lone_surrogates(request: Request) -> None:
    """ApiError (400) when the request's JSON body holds a lone surrogate. A body that cannot be
    read or is not JSON is left to the route (its own 4xx)."""
    try:
        body = await request.body()
    except Exception:  # the client went away mid-body: the route meets it as it always did
        return
    if not _MAYBE_SURROGATE.search(body) and json.detect_encoding(body) == "utf-8":
        return
    try:
        parsed = json.loads(body)
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")  # all of it at once, at C speed
        return
    except UnicodeEncodeError:
        pass
    except (ValueError, RecursionError):  # not JSON, or nested past what the reader takes
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
