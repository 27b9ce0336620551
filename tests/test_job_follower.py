"""The keep-alive ticks of ``JobFollower`` (api/job_stream.py), over a stand-in hub and job
service: a tick comes ``ping_interval`` after the last tick or output, however often the job's
queue position changes meanwhile (the routes that stream text pass positions on to nobody); and
a job whose record vanished ends its stream with a ``job_lost`` error, at a tick or at once when
the hub asks (Redis lost its data)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from typing import Any, cast

from redis.exceptions import RedisError

from api.job_stream import JobFollower
from api.stream_hub import CHECK_JOB, Subscription
from shared.job_store.vocabulary import EventName, JobStatus
from shared.schemas import JobView

PING = 0.3
POSITION_POLL = 0.02


class _Positions:
    def __init__(self) -> None:
        self._places = itertools.count(1000, -1)  # a place nearer the head at every look

    async def recent(self, model: str, job_id: str) -> int:
        return next(self._places)


class _Jobs:
    def __init__(self) -> None:
        self.positions = _Positions()
        self.gone = False  # the job's record vanished (Redis lost it)

    async def exists(self, job_id: str) -> bool:
        return not self.gone

    async def estimated_wait(self, model: str, position: int | None) -> float | None:
        return None


class _Hub:
    def __init__(self) -> None:
        self.sub = Subscription("streamq:events:{job}", "0-0")

    async def subscribe(self, key: str, last_id: str) -> Subscription:
        return self.sub

    def unsubscribe(self, sub: Subscription) -> None:
        pass


async def _follow(seconds: float, deltas_every: float | None = None) -> list[tuple[float, str]]:
    """(time, what) of each item the follower yields within ``seconds``: ``tick``, ``position``
    or an event name. The stream holds the stored ``queued`` event, then (with ``deltas_every``)
    a delta at that pace."""
    hub = _Hub()
    job = JobView(id="job", model="m", status=JobStatus.QUEUED, created_at=time.time())
    follower = JobFollower(cast(Any, _Jobs()), cast(Any, hub), job, None, PING, POSITION_POLL)
    hub.sub.queue.put_nowait(("1-0", {"event": EventName.QUEUED, "data": '{"model": "m"}'}))
    start = time.monotonic()
    seen: list[tuple[float, str]] = []

    async def write_deltas() -> None:
        assert deltas_every is not None
        hub.sub.queue.put_nowait(("2-0", {"event": EventName.STARTED, "data": "{}"}))
        for n in itertools.count(3):
            await asyncio.sleep(deltas_every)
            hub.sub.queue.put_nowait((f"{n}-0", {"event": EventName.DELTA, "data": '{"text": "x"}'}))

    writer = asyncio.ensure_future(write_deltas()) if deltas_every else None
    events = follower.events("0-0")
    try:
        async with asyncio.timeout(seconds):
            async for item in events:
                what = "tick" if item is None else ("position" if item.id is None else item.event)
                seen.append((time.monotonic() - start, what))
    except TimeoutError:
        pass
    finally:
        await events.aclose()
        if writer is not None:
            writer.cancel()
    return seen


def test_ticks_keep_their_pace_while_the_queue_position_changes() -> None:
    seen = asyncio.run(_follow(1.6))
    ticks = [at for at, what in seen if what == "tick"]
    assert sum(what == "position" for _, what in seen) > 10  # a new place every poll
    assert len(ticks) >= 4, seen
    gaps = [later - earlier for earlier, later in itertools.pairwise([0.0, *ticks])]
    assert max(gaps) < PING + 0.15, gaps


def test_output_postpones_the_tick_and_started_does_not() -> None:
    seen = asyncio.run(_follow(1.0, deltas_every=0.1))
    assert [what for _, what in seen if what == "tick"] == []  # a delta every 0.1 s: no silence
    slow = asyncio.run(_follow(1.0, deltas_every=0.45))
    ticks = [at for at, what in slow if what == "tick"]
    assert ticks, slow  # 0.45 s between deltas: a tick 0.3 s after each
    output = [0.0] + [at for at, what in slow if what == "delta"]
    for tick in ticks:
        last = max(at for at in output if at <= tick)
        assert PING - 0.05 <= tick - last < PING + 0.15, slow


async def _follow_until_final(jobs: _Jobs, nudge: bool) -> tuple[float, list[Any]]:
    """Follow a started job whose record is gone; with ``nudge``, the hub asks at once (as after a
    loss of Redis's data). Returns the seconds to the stream's end and what it yielded."""
    hub = _Hub()
    job = JobView(id="job", model="m", status=JobStatus.RUNNING, created_at=time.time())
    follower = JobFollower(cast(Any, jobs), cast(Any, hub), job, None, 10 * PING, POSITION_POLL)
    hub.sub.queue.put_nowait(("1-0", {"event": EventName.STARTED, "data": "{}"}))
    jobs.gone = True
    if nudge:
        hub.sub.queue.put_nowait(CHECK_JOB)
    start = time.monotonic()
    async with asyncio.timeout(5):
        items = [item async for item in follower.events("0-0")]
    return time.monotonic() - start, items


def test_a_job_that_vanished_ends_its_stream_with_job_lost() -> None:
    at_tick, items = asyncio.run(_follow_until_final(_Jobs(), nudge=False))
    assert 10 * PING - 0.05 <= at_tick < 10 * PING + 0.5  # at the keep-alive, not before
    final = items[-1]
    assert final.final and final.event == EventName.ERROR and final.data["type"] == "job_lost"
    at_once, items = asyncio.run(_follow_until_final(_Jobs(), nudge=True))
    assert at_once < 0.5 and items[-1].data["type"] == "job_lost"


def test_the_hubs_question_changes_nothing_for_a_job_that_exists() -> None:
    async def follow() -> list[Any]:
        hub, jobs = _Hub(), _Jobs()
        job = JobView(id="job", model="m", status=JobStatus.RUNNING, created_at=time.time())
        follower = JobFollower(cast(Any, jobs), cast(Any, hub), job, None, PING, POSITION_POLL)
        hub.sub.queue.put_nowait(CHECK_JOB)
        hub.sub.queue.put_nowait(("1-0", {"event": EventName.DELTA, "data": '{"text": "x"}'}))
        items: list[Any] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2 * PING):
                async for item in follower.events("0-0"):
                    items.append(item)
        return items

    items = asyncio.run(follow())
    assert [item.event for item in items if item is not None] == [EventName.DELTA]


def test_a_job_that_left_its_queue_is_not_looked_up_in_it() -> None:
    """Opened after the job started, the stream's stored ``queued`` event has no place (the
    job is in no queue) and nothing is asked of Redis for it; opened while the job waits, its
    place is looked up."""

    async def first_event(entries: list[str]) -> tuple[Any, list[str]]:
        hub, jobs = _Hub(), _Jobs()
        asked: list[str] = []
        recent = jobs.positions.recent

        async def counted(model: str, job_id: str) -> int:
            asked.append(job_id)
            return await recent(model, job_id)

        jobs.positions.recent = counted  # type: ignore[method-assign]
        job = JobView(id="job", model="m", status=JobStatus.QUEUED, created_at=time.time())
        follower = JobFollower(cast(Any, jobs), cast(Any, hub), job, None, PING, POSITION_POLL)
        for n, event in enumerate(entries, 1):
            hub.sub.queue.put_nowait((f"{n}-0", {"event": event, "data": '{"model": "m"}'}))
        events = follower.events("0-0")
        try:
            return await anext(events), asked
        finally:
            await events.aclose()

    started, asked = asyncio.run(first_event([EventName.QUEUED, EventName.STARTED, EventName.DELTA]))
    assert (started.event, started.data["position"], asked) == (EventName.QUEUED, None, [])
    waiting, asked = asyncio.run(first_event([EventName.QUEUED]))
    assert (waiting.data["position"], asked) == (1000, ["job"])


def test_a_redis_error_while_checking_the_job_is_no_job_lost() -> None:
    """The check at a keep-alive fails (Redis blinked): the stream goes on, as for a job that is
    there; only Redis's answer that its record is gone ends it with job_lost."""

    class _Failing(_Jobs):
        async def exists(self, job_id: str) -> bool:
            raise RedisError("Timeout reading from redis")

    async def follow() -> list[Any]:
        hub = _Hub()
        job = JobView(id="job", model="m", status=JobStatus.RUNNING, created_at=time.time())
        follower = JobFollower(cast(Any, _Failing()), cast(Any, hub), job, None, PING, POSITION_POLL)
        hub.sub.queue.put_nowait(CHECK_JOB)
        items: list[Any] = []
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.5 * PING):
                async for item in follower.events("0-0"):
                    items.append(item)
        return items

    items = asyncio.run(follow())
    assert None in items  # keep-alive ticks go on
    assert not [item for item in items if item is not None and item.final]  # and no job_lost
