"""A minimal asyncio HTTP/1.1 client: cheap enough to hold a thousand SSE streams on two cores.

One connection per request (``Connection: close``); the body is read as lines, chunked or not.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any


class HTTPError(Exception):
    pass


async def _request(
    host: str,
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bool, asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, limit=1 << 20)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    for name, value in (headers or {}).items():
        lines.append(f"{name}: {value}")
    if body is not None:
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + (body or b""))
    await writer.drain()
    status_line = await reader.readline()
    if not status_line:
        writer.close()
        raise HTTPError(f"{method} {path}: connection closed before a response")
    status = int(status_line.split()[1])
    chunked = False
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.decode("latin-1").partition(":")
        if name.strip().lower() == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    return status, chunked, reader, writer


async def _body_chunks(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[bytes]:
    if not chunked:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            yield data
    while True:
        size_line = await reader.readline()
        if not size_line:
            return
        size = int(size_line.split(b";")[0].strip() or b"0", 16)
        if size == 0:
            return
        data = await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after each chunk
        yield data


async def post_json(host: str, port: int, path: str, payload: Any) -> tuple[int, Any]:
    status, chunked, reader, writer = await _request(host, port, "POST", path, json.dumps(payload).encode())
    try:
        body = b"".join([c async for c in _body_chunks(reader, chunked)])
    finally:
        writer.close()
    return status, json.loads(body) if body else None


async def stream_lines(
    host: str, port: int, method: str, path: str, payload: Any = None
) -> AsyncIterator[tuple[float, str]]:
    """The response body's lines as they arrive, each with its receipt time (time.time())."""
    body = json.dumps(payload).encode() if payload is not None else None
    status, chunked, reader, writer = await _request(host, port, method, path, body)
    try:
        if status != 200:
            rest = b"".join([c async for c in _body_chunks(reader, chunked)])
            raise HTTPError(f"{method} {path}: HTTP {status}: {rest[:300]!r}")
        pending = b""
        async for data in _body_chunks(reader, chunked):
            now = time.time()
            pending += data
            *complete, pending = pending.split(b"\n")
            for line in complete:
                yield now, line.rstrip(b"\r").decode("utf-8", errors="replace")
    finally:
        writer.close()
