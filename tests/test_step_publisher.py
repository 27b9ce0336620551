"""The publisher against a real Redis: a job's first text and its end are written at once, text
after a quiet interval too, later text coalesced; and a fast engine's steps do not each wake the
publisher's thread (it would take the interpreter from the engine's thread at every step)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from harness.redis_server import RedisServer
from shared import keys
from shared.job_store import scripts
from shared.job_store.scripts import Answer, JobScripts
from shared.job_store.vocabulary import FinishReason, JobField, JobStatus
from shared.schemas import ChatMessage, GenerationRequest
from shared.settings import Settings
from worker.engine import HANDBACK, EngineJob, JobOutput
from worker.step_publisher import StepPublisher

INTERVAL = 0.04  # STREAMQ_PUBLISH_INTERVAL_MS's default
SOON = 0.5  # a write due at once is in Redis well within this (the old publisher could sleep 1 s)


@pytest.fixture
def connection(redis_server: RedisServer) -> Iterator[redis.Redis]:
    r = redis_server.client()
    yield r
    r.close()


@pytest.fixture
def publisher(connection: redis.Redis) -> Iterator[StepPublisher]:
    p = StepPublisher(connection, Settings(publish_interval_ms=int(INTERVAL * 1000)))
    p.start()
    yield p
    p.stop()


def _running_job(r: redis.Redis, job_id: str) -> EngineJob:
    r.hset(keys.job(job_id), mapping={JobField.STATUS: JobStatus.QUEUED, JobField.MODEL: "m"})
    r.expire(keys.job(job_id), 300)
    run = f"w.0:{job_id}"
    start = scripts.start(
        job_id, worker="w", slot="w.0", run=run, now=1.0, attempt=1, lease_ms=60_000, maxlen=100
    )
    assert scripts.started(JobScripts(r).run(start)) == ("running", [])
    request = GenerationRequest(
        messages=[ChatMessage(role="user", content="hi")], max_tokens=500, temperature=0.0, top_p=1.0
    )
    now = time.time()
    return EngineJob(job_id, request, now, now, time.monotonic() + 60, model="m", run=run)


def _output(job: EngineJob, text: str, token: int, end: str | None = None) -> JobOutput:
    job.completion_tokens += 1
    return JobOutput(job, text, 1, job.completion_tokens, end, token_ids=(token,))


def _stored(r: redis.Redis, job_id: str) -> str:
    value = r.get(keys.text(job_id))
    return value.decode() if isinstance(value, bytes) else str(value or "")


def _within(seconds: float, check: object) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():  # type: ignore[operator]
            return True
        time.sleep(0.002)
    return False


def test_first_text_quiet_text_and_end_are_written_at_once(
    publisher: StepPublisher, connection: redis.Redis
) -> None:
    job = _running_job(connection, "pub-at-once")
    publisher.put([_output(job, "Hello", 1)])
    assert _within(SOON, lambda: _stored(connection, job.job_id) == "Hello")
    time.sleep(3 * INTERVAL)  # quiet: the publisher has nothing buffered and sleeps
    publisher.put([_output(job, " world", 2)])
    assert _within(SOON, lambda: _stored(connection, job.job_id) == "Hello world")
    time.sleep(3 * INTERVAL)
    publisher.put([_output(job, "!", 3, end=FinishReason.STOP)])
    assert job.ended.wait(SOON)
    assert job.status == JobStatus.FINISHED
    assert _stored(connection, job.job_id) == "Hello world!"
    assert connection.hget(keys.job(job.job_id), JobField.STATUS) == b"finished"


def test_a_fast_engine_does_not_wake_the_publisher_at_every_step(
    publisher: StepPublisher, connection: redis.Redis
) -> None:
    """200 steps of 1 ms over two jobs: every token in Redis, in order, in about one write per
    interval per job, and the publisher woken only for what was due (not 200 times)."""
    jobs = [_running_job(connection, f"pub-fast-{i}") for i in range(2)]
    steps = 200
    began = time.monotonic()
    for step in range(steps):
        publisher.put([_output(job, f"{step} ", step) for job in jobs])
        time.sleep(0.001)
    elapsed = time.monotonic() - began
    expected = "".join(f"{step} " for step in range(steps))
    for job in jobs:
        assert _within(SOON, lambda job=job: _stored(connection, job.job_id) == expected)
        stored = [int(t) for t in connection.lrange(keys.tokens(job.job_id), 0, -1)]
        assert stored == list(range(steps))
    windows = elapsed / INTERVAL + 2
    assert publisher.round_trips <= 2 * windows, (publisher.round_trips, elapsed)
    assert publisher.wakeups <= 2 * windows, (publisher.wakeups, elapsed)  # not once per step
    assert publisher.wakeups < steps / 2
    publisher.put([_output(job, "", steps, end=FinishReason.LENGTH) for job in jobs])
    assert all(job.ended.wait(SOON) and job.status == JobStatus.FINISHED for job in jobs)


def test_text_put_during_a_round_trip_is_not_left_waiting(
    publisher: StepPublisher, connection: redis.Redis
) -> None:
    """A job's first text put while the publisher waits on Redis for another job's write, and
    nothing after it: written at once, not after the publisher's longest sleep (1 s)."""
    first, second = _running_job(connection, "pub-during-a"), _running_job(connection, "pub-during-b")
    execute = publisher._scripts.execute
    put_during: list[bool] = []

    def slow_execute(pipe: Any, raise_on_error: bool = True) -> list[Any]:
        if not put_during:
            put_during.append(True)
            publisher.put([_output(second, "late?", 7)])
        return execute(pipe, raise_on_error)

    publisher._scripts.execute = slow_execute  # type: ignore[method-assign]
    publisher.put([_output(first, "first", 1)])
    assert _within(SOON, lambda: _stored(connection, first.job_id) == "first")
    assert _within(SOON, lambda: _stored(connection, second.job_id) == "late?")
    publisher.put([_output(job, "", 9, end=FinishReason.STOP) for job in (first, second)])
    assert all(job.ended.wait(SOON) for job in (first, second))


def test_a_stop_writes_buffered_text_at_once_then_waits_for_the_ends(connection: redis.Redis) -> None:
    publisher = StepPublisher(connection, Settings(publish_interval_ms=10_000))  # nothing due for 10 s
    publisher.start()
    job = _running_job(connection, "pub-stop")
    publisher.put([_output(job, "one", 1)])
    assert _within(SOON, lambda: _stored(connection, job.job_id) == "one")
    publisher.put([_output(job, " two", 2)])  # buffered: due in 10 s
    stopping = threading.Thread(target=publisher.stop)
    stopping.start()
    assert _within(SOON, lambda: _stored(connection, job.job_id) == "one two")
    assert stopping.is_alive()  # the job has not ended: the publisher waits for its end
    publisher.put([_output(job, "", 3, end=FinishReason.STOP)])
    assert job.ended.wait(SOON) and job.status == JobStatus.FINISHED
    stopping.join(SOON)
    assert not stopping.is_alive()


def test_a_write_redis_refuses_drops_its_job_only_and_the_others_writes_stand(
    publisher: StepPublisher, connection: redis.Redis
) -> None:
    """A pipeline is not a transaction: when Redis refuses one job's write (here its record is
    of the wrong type; out of memory does the same), the other jobs' writes in the same round
    trip did run. Their later writes must still land, with no hole and no repeat, and the refused
    job is dropped here (to be continued from what Redis holds), not left writing past a hole."""
    good, bad = _running_job(connection, "pr-good"), _running_job(connection, "pr-bad")
    publisher.put([_output(good, "one ", 1), _output(bad, "uno ", 1)])
    assert _within(SOON, lambda: _stored(connection, "pr-good") == "one " and _stored(connection, "pr-bad"))
    connection.delete(keys.job("pr-bad"))
    connection.set(keys.job("pr-bad"), "not a hash", ex=60)  # its next write: WRONGTYPE
    try:
        for n, word in enumerate(["two ", "three ", "four "], start=2):
            publisher.put([_output(good, word, n), _output(bad, "dos ", n)])
            time.sleep(INTERVAL * 1.5)
        publisher.put([_output(good, "five", 5)])
        assert _within(SOON, lambda: _stored(connection, "pr-good") == "one two three four five")
    finally:
        connection.delete(keys.job("pr-bad"))  # other tests read every job's record
    assert bad.lost and bad.cancel.is_set() and not good.lost
    assert connection.llen(keys.tokens("pr-good")) == 5  # every token id, once
    assert int(connection.hget(keys.job("pr-good"), "stored_tokens") or 0) == 5
    assert publisher.round_trips >= 4


def test_a_refused_end_leaves_the_job_to_be_continued_not_failed(
    publisher: StepPublisher, connection: redis.Redis
) -> None:
    """Redis refused the job's end: its record still says running, so the job is continued once
    its lease lapses. Filed failed here, RQ would list it failed, and the janitor end it so."""
    job = _running_job(connection, "pr-end")
    publisher.put([_output(job, "text ", 1)])
    assert _within(SOON, lambda: _stored(connection, "pr-end") == "text ")
    connection.delete(keys.job("pr-end"))
    connection.set(keys.job("pr-end"), "not a hash", ex=60)  # its end: WRONGTYPE
    try:
        publisher.put([_output(job, "end", 2, end=FinishReason.STOP)])
        assert job.ended.wait(SOON)
    finally:
        connection.delete(keys.job("pr-end"))
    assert (job.status, job.lost) == ("lost", True)


def test_a_handback_that_finds_its_job_queued_already_is_a_handback(
    publisher: StepPublisher, connection: redis.Redis
) -> None:
    """The handback was applied and its reply lost (a dropped connection, the pipeline sent
    again), or a janitor requeued the job first: the job is queued, and this run's end is a
    handback (REQUEUED, filed so in RQ), not a "queued" end that RQ would list as finished."""
    job = _running_job(connection, "pub-handed")
    try:
        handback = scripts.requeue(job.job_id, maxlen=100, ttl=60, attempts_allowed=0, run=job.run)
        assert scripts.answer(JobScripts(connection).run(handback)) == "requeued"  # the first time
        publisher.put([JobOutput(job, "", 1, 0, HANDBACK)])  # and again
        assert job.ended.wait(SOON)
        assert job.status == Answer.REQUEUED
        assert connection.hget(keys.job(job.job_id), JobField.STATUS) == b"queued"
    finally:
        connection.delete(keys.job(job.job_id), keys.events(job.job_id))


def test_each_end_is_counted_in_its_models_drain(publisher: StepPublisher, connection: redis.Redis) -> None:
    """The fronts' wait estimates and Retry-After come from the jobs each model ended lately."""
    connection.delete(keys.drained("m"))
    jobs = [_running_job(connection, f"pub-drain-{i}") for i in range(2)]
    publisher.put([_output(job, "done", 1, end=FinishReason.STOP) for job in jobs])
    assert all(job.ended.wait(SOON) for job in jobs)
    now = time.time()  # both counted, each at its end's time
    assert connection.zcard(keys.drained("m")) == connection.zcount(keys.drained("m"), now - 30, now) == 2
    assert connection.ttl(keys.drained("m")) > 0


def test_a_job_found_lost_is_released_when_its_end_comes(
    publisher: StepPublisher, connection: redis.Redis
) -> None:
    """Another run holds the job now (this worker was thought dead): its end is not written, and
    its slot is freed at once, not when its deadline runs out."""
    job = _running_job(connection, "pub-lost")
    connection.hset(keys.job(job.job_id), JobField.RUN, "another-run")
    publisher.put([_output(job, "stale", 1)])
    assert _within(SOON, lambda: job.lost)
    publisher.put([_output(job, "", 2, end=FinishReason.STOP)])
    assert job.ended.wait(SOON) and job.status == "lost"
    assert _stored(connection, job.job_id) == ""  # nothing of it written
