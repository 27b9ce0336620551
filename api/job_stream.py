"""Following one job's events for a client: from the stream hub, with live queue positions,
keep-alive ticks and client-disconnect detection. The SSE route, the seed's chunked stream
and the waiting routes all read a job through ``follow_job``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncGenerator
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request

from api.job_service import JobService
from api.stream_hub import StreamHub, StreamInterrupted
from shared import keys
from shared.job_store.payloads import encode
from shared.job_store.vocabulary import FINAL_EVENTS, EventName


class JobEvent:
    """One event of a job. ``id`` is its stream entry id (None for a live position update).

    It keeps the JSON text of its data as stored, so relaying a delta to an SSE client costs no
    parse and no dump; ``data`` parses it on first use (the waiting routes read the text)."""

    __slots__ = ("_data", "event", "id", "raw")

    def __init__(self, id: str | None, event: str, raw: str) -> None:
        self.id = id
        self.event = event
        self.raw = raw
        self._data: dict[str, Any] | None = None

    @classmethod
    def of(cls, id: str | None, event: str, data: dict[str, Any]) -> JobEvent:
        return cls(id, event, encode(data))

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = json.loads(self.raw or "{}")
        return self._data

    @property
    def final(self) -> bool:
        return self.event in FINAL_EVENTS


class ClientGone(Exception):
    """The HTTP client went away while its job was being followed."""


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _recent_position(jobs: JobService, model: str, job_id: str, known: int | None) -> int | None:
    """The job's place in its queue; the last known one if Redis does not answer now."""
    try:
        return await jobs.positions.recent(model, job_id)
    except RedisError:
        return known


async def _queued_event(
    jobs: JobService, id: str | None, model: str, data: dict[str, Any], position: int | None
) -> JobEvent:
    """A ``queued`` event with the job's place now and the wait that place means (None if unknown)."""
    try:
        wait = await jobs.estimated_wait(model, position)
    except RedisError:
        wait = None
    return JobEvent.of(id, EventName.QUEUED, {**data, "position": position, "estimated_wait_seconds": wait})


async def follow_job(
    jobs: JobService,
    hub: StreamHub,
    job_id: str,
    model: str,
    last_id: str,
    request: Request | None,
    ping_interval: float,
    position_interval: float,
) -> AsyncGenerator[JobEvent | None, None]:
    """Yield the job's events after ``last_id`` until its final event, and None as a
    keep-alive tick after ``ping_interval`` seconds without one. While the job waits in its
    queue, a ``queued`` event (without id) reports each change of its position. Raises
    ClientGone when ``request``'s client disconnects, StreamInterrupted when Redis cannot be read
    (the client may resume later from the last id it got)."""
    try:
        sub = await hub.subscribe(keys.events(job_id), last_id)
    except RedisError as exc:
        raise StreamInterrupted(f"the job store (Redis) failed: {exc}") from exc
    get: asyncio.Future[Any] | None = None
    gone = asyncio.ensure_future(_wait_disconnect(request)) if request is not None else None
    waiting = True  # until a started/delta/final event shows the job left its queue
    position: int | None = None
    last_sent = time.monotonic()
    try:
        while True:
            if gone is not None and gone.done():
                raise ClientGone()
            if sub.queue.empty():
                timeout = min(
                    ping_interval - (time.monotonic() - last_sent), position_interval if waiting else 1e9
                )
                get = asyncio.ensure_future(sub.queue.get())
                done, _ = await asyncio.wait(
                    {get, gone} if gone is not None else {get},
                    timeout=max(timeout, 0.0),
                    return_when="FIRST_COMPLETED",
                )
                if gone is not None and gone in done:
                    raise ClientGone()
                if get not in done:  # idle: report a new queue position, or keep the line alive
                    get.cancel()
                    if waiting:
                        now_at = await _recent_position(jobs, model, job_id, position)
                        if now_at != position and now_at is not None:
                            position = now_at
                            last_sent = time.monotonic()
                            yield await _queued_event(jobs, None, model, {"model": model}, position)
                            continue
                    if time.monotonic() - last_sent >= ping_interval:
                        last_sent = time.monotonic()
                        yield None
                    continue
                entry = get.result()
            else:  # events are waiting already: no task, no wait
                entry = sub.queue.get_nowait()
            if entry is None:
                raise StreamInterrupted(sub.interrupted or "the job's stream was interrupted")
            entry_id, fields = entry
            item = JobEvent(entry_id, fields.get("event", ""), fields.get("data") or "{}")
            if item.event == EventName.QUEUED:  # the stored event says when; the place is told now
                position = await _recent_position(jobs, model, job_id, position)
                item = await _queued_event(jobs, entry_id, model, item.data, position)
            elif item.event in (EventName.STARTED, EventName.DELTA) or item.final:
                waiting = False
            last_sent = time.monotonic()
            yield item
            if item.final:
                return
    finally:
        hub.unsubscribe(sub)
        for task in (get, gone):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


def sse_message(event: JobEvent | None) -> bytes:
    """Server-Sent Events framing; None is the keep-alive comment."""
    if event is None:
        return b": ping\n\n"
    head = f"id: {event.id}\n" if event.id else ""
    return f"{head}event: {event.event}\ndata: {event.raw}\n\n".encode()
