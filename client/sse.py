"""A Server-Sent Events parser with no I/O: feed it the lines of a stream, get its events.

It follows the WHATWG rules the front's streams use: ``id:``, ``event:``, ``data:`` (one or more,
joined by newlines), comment lines starting with ``:``, and a blank line ending each
event. The sync and async clients both read their streams through it.
"""

from __future__ import annotations

import json

from shared.schemas import StreamEvent


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
