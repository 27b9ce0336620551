"""Following one job's events for a client, from the stream hub: live queue positions while it
waits, keep-alive ticks, and the client's disconnect. ``RedisJobClient.follow`` makes one
``JobFollower`` per client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from typing import Any

from redis.exceptions import RedisError
from starlette.requests import Request

from api.job_client import ClientGone, Events, JobEvent, StreamInterrupted
from api.job_service import JobService
from api.stream_hub import CHECK_JOB, Entry, StreamHub, Subscription
from shared import keys
from shared.job_store.payloads import Failed
from shared.job_store.vocabulary import EventName
from shared.schemas import JobView

log = logging.getLogger("streamq.api")

_IDLE = object()  # no event within the wait: time for a position update or a keep-alive
_GONE: Entry = ("", {"client": "gone"})  # put in the subscription's queue when the client disconnects
JOB_LOST = (
    "the job store (Redis) lost this job: it restarted empty or failed over without it; submit the "
    "request again"
)


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _tell_gone(sub: Subscription, gone: asyncio.Future[Any]) -> None:
    """The disconnect watcher ended: wake the follower waiting on ``sub`` (unless it was stopped)."""
    if not gone.cancelled():
        sub.queue.put_nowait(_GONE)


class JobFollower:
    """One client's view of one job's events (see ``JobClient.follow``)."""

    def __init__(
        self,
        jobs: JobService,
        hub: StreamHub,
        job: JobView,
        request: Request | None,
        ping_interval: float,
        position_interval: float,
    ) -> None:
        self._jobs = jobs
        self._hub = hub
        self._job_id = job.id
        self._model = job.model
        self._request = request
        self._ping_interval = ping_interval
        self._position_interval = position_interval
        self._waiting = True  # until a started/delta/final event shows the job left its queue
        self._position: int | None = None
        # Keep-alive ticks come ping_interval after the last tick or output (a delta, the final
        # event), whatever else was yielded: the routes that stream text (``POST /stream``, the
        # OpenAI streams) pass neither queue positions nor ``started`` on to their client, so a
        # tick must not wait on those, or a client behind a proxy's read timeout meets a longer
        # silence than ping_interval.
        self._last_beat = time.monotonic()
        self._gone: asyncio.Future[Any] | None = None

    async def events(self, after: str) -> Events:
        try:
            sub = await self._hub.subscribe(keys.events(self._job_id), after)
        except RedisError as exc:  # the client is told what failed, the log where and how
            log.warning("job %s: its stream could not be opened: %s", self._job_id, exc)
            raise StreamInterrupted("the job store (Redis) failed") from exc
        if self._request is not None:
            self._gone = asyncio.ensure_future(_wait_disconnect(self._request))
            self._gone.add_done_callback(partial(_tell_gone, sub))
        try:
            while True:
                entry = await self._next_entry(sub)
                if entry is CHECK_JOB:
                    if await self._job_exists():
                        continue
                    yield await self._lost()
                    return
                if entry is _IDLE:
                    update = await self._idle()
                    if update is not _IDLE:
                        yield update  # a position update, None (a tick), or the job's loss
                        if update is not None and update.final:
                            return
                    continue
                item = await self._event(entry, moved_on=not sub.queue.empty())
                if item.event == EventName.DELTA or item.final:
                    self._last_beat = time.monotonic()
                yield item
                if item.final:
                    return
        finally:
            self._hub.unsubscribe(sub)
            if self._gone is not None and not self._gone.done():
                self._gone.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._gone

    async def _next_entry(self, sub: Subscription) -> Any:
        """The subscription's next entry, or _IDLE when none came in time. Raises ClientGone and
        StreamInterrupted."""
        if self._gone is not None and self._gone.done():
            raise ClientGone()
        if sub.queue.empty():
            # One wait on the queue, with a deadline: per event, a future and a timer. (A task
            # for the get and asyncio.wait over it and the disconnect, as before, cost a front
            # relaying 20,000 deltas a second about a tenth of a core.) The disconnect comes
            # into the queue instead (_GONE).
            since = time.monotonic() - self._last_beat
            timeout = min(self._ping_interval - since, self._position_interval if self._waiting else 1e9)
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    entry = await sub.queue.get()
            except TimeoutError:
                return _IDLE
        else:  # events are waiting already: no wait
            entry = sub.queue.get_nowait()
        if entry is _GONE:
            raise ClientGone()
        if entry is None:
            raise StreamInterrupted(sub.interrupted or "the job's stream was interrupted")
        return entry

    async def _idle(self) -> Any:
        """A keep-alive tick (None) once ``ping_interval`` passed since the last tick or output
        (first, so that positions changing at every look cannot hold it back); else, while
        queued, a new position (a ``queued`` event without id); else _IDLE."""
        if time.monotonic() - self._last_beat >= self._ping_interval:
            self._last_beat = time.monotonic()
            if not await self._job_exists():
                return await self._lost()
            return None
        if self._waiting:
            now_at = await self._recent_position()
            if now_at != self._position and now_at is not None:
                self._position = now_at
                return await self._queued(None, {"model": self._model})
        return _IDLE

    async def _job_exists(self) -> bool:
        """False only when Redis answers that the job's record is gone (not when it fails)."""
        try:
            return await self._jobs.exists(self._job_id)
        except RedisError:
            return True

    async def _lost(self) -> JobEvent:
        """The final ``error`` event of a job whose record vanished with Redis's data."""
        return JobEvent(None, EventName.ERROR, Failed(type="job_lost", message=JOB_LOST).encode())

    async def _event(self, entry: tuple[str, dict[str, str]], moved_on: bool = False) -> JobEvent:
        """The client's event for a stream entry. ``moved_on``: later entries are here already
        (the job has left its queue since, as a client opening the stream of a job that started
        finds): a ``queued`` event's place is then none, not looked up in Redis."""
        entry_id, fields = entry
        item = JobEvent(entry_id, fields.get("event", ""), fields.get("data") or "{}")
        if item.event == EventName.QUEUED:  # the stored event says when; the place is told now
            self._position = None if moved_on else await self._recent_position()
            return await self._queued(entry_id, item.data)
        if item.event in (EventName.STARTED, EventName.DELTA) or item.final:
            self._waiting = False
        return item

    async def _recent_position(self) -> int | None:
        """The job's place in its queue; the last known one if Redis does not answer now."""
        try:
            return await self._jobs.positions.recent(self._model, self._job_id)
        except RedisError:
            return self._position

    async def _queued(self, id: str | None, data: dict[str, Any]) -> JobEvent:
        """A ``queued`` event with the job's place now and the wait it means (None if unknown)."""
        try:
            wait = await self._jobs.estimated_wait(self._model, self._position)
        except RedisError:
            wait = None
        where = {"position": self._position, "estimated_wait_seconds": wait}
        return JobEvent.of(id, EventName.QUEUED, {**data, **where})
