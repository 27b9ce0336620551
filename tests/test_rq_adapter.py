"""What streamq writes in RQ's records (worker/rq_worker.py, worker/rq_runs.py) as jobs run,
against the installed RQ, which pyproject bounds.

The adapter subclasses RQ for the plain ``rq worker -w`` way, and the dispatcher of ``streamq
worker`` writes RQ's records with RQ's own primitives. These tests run both (the dispatcher, and
a real RQ worker loop in a thread) on a real Redis, to check that each outcome of a job is filed
where RQ files it: an RQ release that moved any of it fails here. The hooks, private attributes
and parameters of RQ they rely on are checked in tests/test_rq_interface.py, the job a front
submits in tests/test_rq_submit.py.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import (
    CanceledJobRegistry,
    FailedJobRegistry,
    FinishedJobRegistry,
    StartedJobRegistry,
)
from rq.worker import BaseWorker, SimpleWorker

from harness.redis_server import RedisServer
from shared import keys
from shared.job_store import scripts
from shared.job_store.scripts import JobScripts
from shared.settings import Settings
from tests.rq_doubles import Scripted, dispatch_in_a_thread, enqueue, unique
from worker.dispatcher import IDLE_WAIT, Dispatcher
from worker.job_runner import JobFailed, Outcome
from worker.rq_runs import RqRuns
from worker.rq_worker import StreamqWorker


class UnsubscribedWorker(StreamqWorker):
    """A StreamqWorker without RQ's command channel: at teardown, RQ stops that channel's thread
    while redis-py may be waiting up to 60 s for a subscription (it then holds ``work`` that
    long, and the finished registry's 60 s entries expire before they are read)."""

    def subscribe(self) -> None:
        pass


COUNTERS = ("successful_job_count", "failed_job_count")


@pytest.mark.parametrize("taker", ["dispatcher", "rq-worker"])
def test_each_outcome_is_filed_in_rq_as_the_job_ended(redis_server: RedisServer, taker: str) -> None:
    """The same jobs, ending the same ways, taken by ``streamq worker``'s dispatcher and by RQ's
    own worker loop (``rq worker -w worker.rq_worker.StreamqWorker``): RQ's records agree."""
    model = unique("rq-contract")
    ends: dict[str, list[Any]] = {
        "handed-back": [Outcome.REQUEUED, Outcome.FINISHED],
        "done": [Outcome.FINISHED],
        "canceled": [Outcome.CANCELED],
        "lost": [Outcome.LOST],
        "failed": [JobFailed("job failed: boom")],
        "gone": [Outcome.MISSING],
    }
    ids = {name: f"{model}-{name}" for name in ends}
    queue = enqueue(redis_server, model, list(ids.values()))
    runtime = Scripted(redis_server, model, {ids[name]: then for name, then in ends.items()})
    settings = Settings(result_ttl=600)  # outlives a teardown RQ may hold for 60 s
    slot = f"{model}.0"
    connection = redis_server.client()
    if taker == "dispatcher":
        thread, failed = dispatch_in_a_thread(Dispatcher(connection, runtime, 1, model, settings, burst=True))
        thread.join(timeout=60)
        assert not thread.is_alive() and not failed
    else:  # as `rq worker -w worker.rq_worker.StreamqWorker --burst` runs it, in the main thread
        worker = UnsubscribedWorker(connection=connection, settings=settings, runtime=runtime, name=slot)
        worker.work(burst=True, logging_level="WARNING")
    assert not [w for w in SimpleWorker.all(connection=connection) if w.name.startswith(model)]
    # `rq info`'s counters of the worker (its record outlives it for a minute): the 3 finished runs
    # (done, gone, the handed-back job's second run) and the failed one.
    counted = connection.hmget(f"rq:worker:{model if taker == 'dispatcher' else slot}", *COUNTERS)
    assert [int(n or 0) for n in counted] == [3, 1]

    # Handed back to the front of its queue: taken again next, and delivered once.
    assert [job_id for job_id, _ in runtime.calls] == [ids["handed-back"], *ids.values()]
    assert {s for _, s in runtime.calls} == {slot}  # the slot that took the job runs it
    assert runtime.enqueued_at[1] > runtime.enqueued_at[0]  # RQ's record was queued again too
    assert queue.count == 0

    def status(name: str) -> JobStatus | None:
        return Job.fetch(ids[name], connection=redis_server.client()).get_status()

    finished = FinishedJobRegistry(queue=queue).get_job_ids()
    assert sorted(finished) == sorted(ids[n] for n in ("done", "gone", "handed-back"))
    assert [status(n) for n in ("done", "gone", "handed-back")] == [JobStatus.FINISHED] * 3
    done = Job.fetch(ids["done"], connection=redis_server.client())
    assert done.return_value() == "finished"  # RQ keeps the final status as the job's result

    assert CanceledJobRegistry(queue=queue).get_job_ids() == [ids["canceled"]]
    assert status("canceled") == JobStatus.CANCELED

    assert FailedJobRegistry(queue=queue).get_job_ids() == [ids["failed"]]
    assert status("failed") == JobStatus.FAILED
    result = Job.fetch(ids["failed"], connection=redis_server.client()).latest_result()
    assert result is not None and "boom" in (result.exc_string or "")

    # Lost: another worker holds it now; this one leaves RQ's record to that worker.
    everywhere = set(finished) | set(CanceledJobRegistry(queue=queue).get_job_ids())
    everywhere |= set(FailedJobRegistry(queue=queue).get_job_ids())
    assert ids["lost"] not in everywhere
    assert StartedJobRegistry(queue=queue).get_job_ids() == []


def test_a_plain_rq_worker_fails_a_streamq_job_clearly(redis_server: RedisServer) -> None:
    job_id = unique("plain")
    queue = enqueue(redis_server, unique("rq-plain"), [job_id])
    SimpleWorker([queue], connection=redis_server.client()).work(burst=True, logging_level="WARNING")
    assert FailedJobRegistry(queue=queue).get_job_ids() == [job_id]
    result = Job.fetch(job_id, connection=redis_server.client()).latest_result()
    assert result is not None and "no model is loaded in this process" in (result.exc_string or "")


def test_a_dispatcher_takes_as_many_queued_jobs_as_it_has_room_for_in_rqs_order(
    redis_server: RedisServer,
) -> None:
    model = unique("rq-take")
    job_ids = [f"{model}-{i}" for i in range(5)]
    queue = enqueue(redis_server, model, job_ids)
    worker = SimpleWorker([queue], name=model, connection=redis_server.client())
    runs = RqRuns(redis_server.client(), worker, result_ttl=60, job_timeout=300)
    assert runs.take(3, wait=1) == job_ids[:1]  # waiting: the first alone, to start it at once
    assert runs.take(2, wait=None) == job_ids[1:3]  # not waiting: as many as asked for
    parked = keys.intermediate(queue.key)
    assert redis_server.client().lrange(parked, 0, -1) == [j.encode() for j in job_ids[:3]]
    assert runs.take(8, wait=None) == job_ids[3:]  # what is left, no more
    assert runs.take(8, wait=None) == [] and queue.count == 0
    begun = runs.begin(job_ids)
    assert [run.job_id for run in begun] == job_ids
    assert redis_server.client().llen(parked) == 5  # until streamq's start takes each off
    start = scripts.start(
        job_ids[0],
        worker="w",
        slot="w.0",
        run="r",
        now=1.0,
        attempt=1,
        lease_ms=1000,
        maxlen=10,
        taken_into=parked,
    )
    answer, _ = scripts.started(JobScripts(redis_server.client()).run(start))
    assert answer == "missing"  # no streamq job here
    assert redis_server.client().lrange(parked, 0, -1) == [j.encode() for j in job_ids[1:]]
    assert [run.fields for run in begun] == [{}] * 5  # streamq's state, read for the run (none here)
    assert sorted(StartedJobRegistry(queue=queue).get_job_ids()) == sorted(job_ids)
    assert {Job.fetch(j, connection=redis_server.client()).get_status() for j in job_ids} == {
        JobStatus.STARTED
    }


def test_a_dispatcher_whose_name_rq_still_lists_as_live_registers_under_a_suffix(
    redis_server: RedisServer,
) -> None:
    """A worker restarted with the same host name and pid (a container's) finds its killed
    predecessor's record, live for RQ's TTL: it still starts, as ``<name>.<suffix>``."""
    model = unique("rq-restarted")
    connection = redis_server.client()
    SimpleWorker(
        [Queue(keys.queue_name(model), connection=connection)], name=model, connection=connection
    ).register_birth()
    dispatcher = Dispatcher(connection, Scripted(redis_server, model, {}), 2, model, Settings())
    thread, failed = dispatch_in_a_thread(dispatcher)
    wait = time.monotonic() + 10
    while len([w for w in SimpleWorker.all(connection=connection) if w.name.startswith(model)]) < 2:
        assert time.monotonic() < wait and not failed
        time.sleep(0.05)
    renamed = dispatcher.rq_worker.name
    assert renamed.startswith(f"{model}.") and dispatcher.runs.worker_name == renamed
    dispatcher.stop_taking()
    thread.join(timeout=IDLE_WAIT + 10)
    assert not thread.is_alive() and not failed
    assert [w.name for w in SimpleWorker.all(connection=connection) if w.name.startswith(model)] == [model]


def test_a_worker_enters_rqs_lists_again_after_redis_came_back_empty(redis_server: RedisServer) -> None:
    """`rq info` showed no worker after Redis restarted empty, until each worker restarted: RQ's
    heartbeat wrote back a record of the worker's name with no birth and no queues, outside RQ's
    lists. ``reannounce`` (on a loss that the epoch watch noticed) replaces it whole, in one step,
    with the state last written."""
    model = unique("reannounce")
    connection = redis_server.client()
    worker = UnsubscribedWorker(
        connection=connection,
        settings=Settings(),
        runtime=Scripted(redis_server, model, {}),
        name=f"{model}.0",
    )
    queue = keys.queue_name(model)

    def in_rq_info() -> BaseWorker | None:
        return next((w for w in SimpleWorker.all(connection=connection) if w.name == worker.name), None)

    worker.register_birth()
    worker.set_state("busy")
    try:
        # Redis loses this worker's records (not the whole shared test Redis: its own keys only).
        connection.delete(worker.key)
        connection.srem("rq:workers", worker.key)
        connection.srem(f"rq:workers:{queue}", worker.key)
        connection.srem(keys.RQ_QUEUES, f"rq:queue:{queue}")
        worker.heartbeat()  # RQ's loop beats on
        assert connection.exists(worker.key) and in_rq_info() is None
        worker.reannounce()
        found = in_rq_info()
        assert found is not None and found.queue_names() == [queue] and found.get_state() == "busy"
        assert (
            connection.hget(worker.key, "birth") and 0 < connection.ttl(worker.key) <= worker.worker_ttl + 60
        )
        assert queue in {q.name for q in Queue.all(connection=connection)}
    finally:
        worker.register_death()
