"""Every error answer the front gives, counted by status and the envelope's ``code``
(``streamq_api_errors_total``): refusals (429 ``rate_limit_exceeded``, ``concurrency_limit_exceeded``,
``queue_full``; 503 ``model_unavailable``), bad requests (400 by code, 401, 413) and failures
(5xx) show in the metrics, whichever layer answered (a route, the key check, the body limit).

An ASGI middleware outside all the others: it reads the status of each answer, and for an error
in the JSON envelope the ``code`` of its first body chunk (the envelope is small, sent whole); an
unexpected exception, which the server answers with its 500 outside every middleware, counts as
a 500 with no code. A code that is not one of streamq's short snake_case names counts as
``other``, so the series stay few; an error with no code counts as ``none``. A JSON answer that
is no error envelope is not counted: ``/readyz``'s 503 says the front is not ready (a probe's
answer, polled while workers load), not that a request failed.
"""

from __future__ import annotations

import json
import re

from prometheus_client import Counter
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_CODE = re.compile(r"[a-z][a-z0-9_]{0,47}")


def envelope_code(body: bytes) -> str | None:
    """The ``error.code`` of an error envelope, as a label value; None for JSON that is no error
    envelope (a readiness probe's answer)."""
    try:
        answer = json.loads(body)
    except ValueError:
        return "other"
    if not isinstance(answer, dict) or not isinstance(answer.get("error"), dict):
        return None
    code = answer["error"].get("code")
    if code is None:
        return "none"
    return code if isinstance(code, str) and _CODE.fullmatch(code) else "other"


def count_errors(app: ASGIApp, counter: Counter) -> ASGIApp:
    """``app``, with each of its error answers counted in ``counter`` (status, code)."""

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        status = 0
        enveloped = False

        async def counted(message: Message) -> None:
            nonlocal status, enveloped
            what = message["type"].removeprefix("websocket.")  # a refused WebSocket's answer too
            if what == "http.response.start":
                status = int(message["status"])
                if status >= 400:  # a success costs this one comparison
                    kind = dict(message.get("headers") or []).get(b"content-type", b"")
                    enveloped = kind.startswith(b"application/json")
                    if not enveloped:
                        counter.labels(str(status), "none").inc()
            elif what == "http.response.body" and enveloped:
                enveloped = False  # the first chunk holds the envelope
                code = envelope_code(message.get("body", b""))
                if code is not None:
                    counter.labels(str(status), code).inc()
            await send(message)

        if scope["type"] not in ("http", "websocket"):
            await app(scope, receive, send)
            return
        try:
            await app(scope, receive, counted)
        except Exception:
            if not status:  # answered by the server's own 500, outside every middleware
                counter.labels("500", "none").inc()
            raise

    return counting
