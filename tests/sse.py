"""A small Server-Sent Events reader for tests (what a browser's EventSource does)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from streamq.sse import sse_lines


@dataclass
class SSE:
    event: str
    data: Any
    id: str | None


def read_events(response: httpx.Response) -> Iterator[SSE | None]:
    """Events as they arrive; None for a comment line (keep-alive)."""
    data: list[str]
    event, data, event_id = "message", [], None
    for line in sse_lines(response.iter_text()):
        if line == "":
            if data:
                yield SSE(event, json.loads("\n".join(data)), event_id)
            event, data, event_id = "message", [], None
        elif line.startswith(":"):
            yield None
        else:
            name, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                event = value
            elif name == "data":
                data.append(value)
            elif name == "id":
                event_id = value


def follow(client: httpx.Client, url: str, job_id: str, last_event_id: str | None = None) -> list[SSE]:
    """All events of a job until its final one."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    with client.stream("GET", f"{url}/v1/jobs/{job_id}/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        return events_to_final(response)


def events_to_final(response: httpx.Response) -> list[SSE]:
    """The events of an open job stream, up to and with its final one."""
    events: list[SSE] = []
    for event in read_events(response):
        if event is None:
            continue
        events.append(event)
        if event.event in ("done", "error", "canceled"):
            break
    return events


def text_of(events: list[SSE]) -> str:
    return "".join(e.data["text"] for e in events if e.event == "delta")
