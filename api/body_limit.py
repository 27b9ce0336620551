"""A request body larger than ``STREAMQ_MAX_BODY_BYTES`` is refused with 413 before any route reads it,
and one sent compressed (a ``Content-Encoding`` but ``identity``) with 415: the routes read JSON
as it is sent, and would take a gzip body for bad JSON, or a plain body labelled gzip as plain.

A declared ``Content-Length`` over the limit is refused once the body is read and dropped, up to
``DRAIN_FACTOR`` times the limit: a reverse proxy (nginx) sends a body it has buffered whole, and
a server that answers and closes before reading it breaks the proxy's write, which the client
then sees as the proxy's 502, not this 413. A longer one is refused without reading (the
connection closes). A body sent without a length (chunked, or HTTP/2) is read up to the limit
and then handed on whole, or refused once it passes it.
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_envelope

DRAIN_FACTOR = 8  # a body declared up to this many times the limit is read (and dropped) before the 413


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        encoding = headers.get(b"content-encoding", b"").decode("latin-1").strip()
        if encoding and encoding.lower() != "identity":
            refusal = f"the body's Content-Encoding '{encoding}' is not supported: send it uncompressed"
            await _refuse(send, 415, refusal, "unsupported_content_encoding")
            return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                declared = -1
            if declared > self.max_bytes:
                if declared <= DRAIN_FACTOR * self.max_bytes and not await _drained(receive):
                    return  # the client went away while sending
                await self._refuse(send)
                return
            await self.app(scope, receive, send)  # the server holds the body to its length
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(b"".join(chunks), receive), send)

    async def _refuse(self, send: Send) -> None:
        message = f"the request body is larger than {self.max_bytes} bytes (STREAMQ_MAX_BODY_BYTES)"
        await _refuse(send, 413, message, "request_too_large")


async def _drained(receive: Receive) -> bool:
    """Read the rest of the body and drop it; False if the client went away first."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return False
        if not message.get("more_body", False):
            return True


async def _refuse(send: Send, status: int, message: str, code: str) -> None:
    body = JSONResponse(error_envelope(message, "invalid_request_error", code=code)).body  # as every error
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body already read, as one message; then the client's own messages (a disconnect)."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
