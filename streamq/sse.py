"""A Server-Sent Events parser with no I/O: feed it the lines of a stream, get its events.

It follows the WHATWG rules the front's streams use: ``id:``, ``event:``, ``data:`` (one or more,
joined by newlines), comment lines starting with ``:``, and a blank line ending each
event. The sync and async clients both read their streams through it.

Lines end at CR, LF or CRLF and nowhere else: a text's own U+2028, U+2029 or U+0085 is no line
break in SSE (``str.splitlines`` and httpx's ``iter_lines`` treat them as one, and cut the event).
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator

from shared.schemas import StreamEvent

_LINE_END = re.compile(r"\r\n|\r|\n")


class LineSplitter:
    """Cuts decoded stream text into SSE lines (CR, LF or CRLF), across chunk boundaries."""

    def __init__(self) -> None:
        self._buffer = ""

    def feed(self, text: str) -> list[str]:
        self._buffer += text
        lines: list[str] = []
        start = 0
        for end in _LINE_END.finditer(self._buffer):
            if end.group() == "\r" and end.end() == len(self._buffer):
                break  # a CR last in the chunk may be the first half of a CRLF
            lines.append(self._buffer[start : end.start()])
            start = end.end()
        self._buffer = self._buffer[start:]
        return lines

    def close(self) -> list[str]:
        """The last line, if the stream ended right after a CR (an unended line is no line)."""
        rest, self._buffer = self._buffer, ""
        return [rest[:-1]] if rest.endswith("\r") else []


def sse_lines(chunks: Iterable[str]) -> Iterator[str]:
    """The SSE lines of a stream of text chunks (``response.iter_text()``)."""
    splitter = LineSplitter()
    for chunk in chunks:
        yield from splitter.feed(chunk)
    yield from splitter.close()


async def asse_lines(chunks: AsyncIterable[str]) -> AsyncIterator[str]:
    """The SSE lines of an async stream of text chunks (``response.aiter_text()``)."""
    splitter = LineSplitter()
    async for chunk in chunks:
        for line in splitter.feed(chunk):
            yield line
    for line in splitter.close():
        yield line


class SSEParser:
    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._event = "message"
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> StreamEvent | None:
        """Take one line (without its line ending); return the event a blank line completes."""
        if line == "":
            if not self._data:
                self._reset()
                return None
            raw = "\n".join(self._data)
            try:
                data = json.loads(raw)
            except ValueError:
                data = {"raw": raw}
            event = StreamEvent(
                id=self._id, event=self._event, data=data if isinstance(data, dict) else {"value": data}
            )
            self._reset()
            return event
        if line.startswith(":"):  # a comment: the front's keep-alive ``: ping``
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value or "message"
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value or None
        # ``retry:`` is not used: reconnects follow the client's own Backoff.
        return None
