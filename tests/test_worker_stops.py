"""A worker told to stop (SIGTERM), against the installed RQ on a real Redis: it leaves RQ's list
of workers soon; a job its wait on the queue brings after that goes back to the queue's head,
never begun, in order and never twice; one taken, or started as its engine stops, is handed back
to its queue at once, in streamq and in RQ."""

from __future__ import annotations

import os
import threading
import time
import uuid
from typing import Any

import pytest
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.worker import SimpleWorker

from harness.redis_server import RedisServer
from harness.services import wait_for
from shared import keys
from shared.job_store import scripts
from shared.job_store.payloads import Queued
from shared.job_store.rq_records import QueuedRecords
from shared.job_store.scripts import JobScripts
from shared.job_store.vocabulary import JobField
from shared.job_store.vocabulary import JobStatus as StreamqStatus
from shared.schemas import ChatMessage, GenerationRequest
from shared.settings import Settings
from shared.stranded_jobs import StrandedJobs
from tests.processes import blocked_in
from tests.rq_doubles import Scripted, dispatch_in_a_thread, enqueue, slot_threads, unique
from worker.dispatcher import IDLE_WAIT, Dispatcher
from worker.job_runner import JobRunner, Outcome
from worker.rq_runs import RqRuns
from worker.runtime import build_runtime
from worker.tasks import TASK


def test_an_idle_dispatcher_is_one_rq_worker_and_stops_soon_after_it_is_asked(
    redis_server: RedisServer,
) -> None:
    model = unique("rq-idle")
    dispatcher = Dispatcher(
        redis_server.client(), Scripted(redis_server, model, {}), 8, model, Settings(maintenance_interval=60)
    )
    slot_threads_before = slot_threads()
    thread, failed = dispatch_in_a_thread(dispatcher)
    wait_for(lambda: blocked_in(redis_server.client(), os.getpid(), "blmove"), 30, "the wait on its queue")
    assert thread.is_alive()
    # Its 8 slots' threads are up before any job comes (a burst's first jobs wait for none).
    assert len(slot_threads() - slot_threads_before) == 8
    (listed,) = [w for w in SimpleWorker.all(connection=redis_server.client()) if w.name.startswith(model)]
    assert (listed.name, listed.get_state(), listed.queue_names()) == (
        model,
        "idle",
        [keys.queue_name(model)],
    )
    asked = time.monotonic()
    dispatcher.stop_taking()
    thread.join(timeout=IDLE_WAIT + 10)
    assert not thread.is_alive() and not failed
    assert time.monotonic() - asked < IDLE_WAIT + 2
    assert model not in {w.name for w in SimpleWorker.all(connection=redis_server.client())}


def test_a_job_that_comes_while_a_stopping_dispatcher_waits_stays_queued(redis_server: RedisServer) -> None:
    """Told to stop while it waits on its queue (up to IDLE_WAIT), a dispatcher that the wait
    then brings a job puts it back at the queue's head, never begun: another worker's."""
    model = unique("rq-stop-wait")
    connection = redis_server.client()
    dispatcher = Dispatcher(connection, Scripted(redis_server, model, {}), 2, model, Settings())
    thread, failed = dispatch_in_a_thread(dispatcher)
    wait_for(lambda: blocked_in(connection, os.getpid(), "blmove"), 30, "the wait on its queue")
    dispatcher.stop_taking()
    job_ids = [unique("late"), unique("later")]
    queue = enqueue(redis_server, model, job_ids)
    thread.join(timeout=IDLE_WAIT + 10)
    assert not thread.is_alive() and not failed
    assert queue.job_ids == job_ids and connection.llen(keys.intermediate(queue.key)) == 0
    assert {Job.fetch(j, connection=connection).get_status() for j in job_ids} == {JobStatus.QUEUED}
    assert StartedJobRegistry(queue=queue).get_job_ids() == []


def test_ids_put_back_go_to_the_queues_head_in_order_and_never_twice(redis_server: RedisServer) -> None:
    model = unique("rq-put-back")
    job_ids = [f"{model}-{i}" for i in range(3)]
    queue = enqueue(redis_server, model, job_ids)
    connection = redis_server.client()
    runs = RqRuns(
        connection, SimpleWorker([queue], name=model, connection=connection), result_ttl=60, job_timeout=300
    )
    taken = runs.take(2, wait=None)
    connection.lpush(queue.key, taken[1])  # a janitor queued this one again meanwhile
    connection.lrem(keys.intermediate(queue.key), 1, taken[1])
    runs.put_back(taken)
    assert queue.job_ids == [job_ids[0], job_ids[1], job_ids[2]]
    assert connection.llen(keys.intermediate(queue.key)) == 0


class StoppingEngine:
    """The one thing a JobRunner asks an engine before a job starts: whether it is stopping."""

    def stopping(self) -> bool:
        return True


def submitted(connection: Any, model: str) -> tuple[Queue, str]:
    """A job submitted to ``model``'s queue as a front submits it (one script): its queue and id."""
    queue = Queue(keys.queue_name(model), connection=connection)
    job_id = uuid.uuid4().hex
    request = GenerationRequest(
        messages=[ChatMessage(role="user", content="hi")], max_tokens=4, temperature=0.0, top_p=1.0
    )
    records = QueuedRecords(queue, TASK, timeout=300, result_ttl=600)
    fields: dict[str, str] = {
        JobField.ID: job_id,
        JobField.STATUS: StreamqStatus.QUEUED,
        JobField.MODEL: model,
        JobField.CREATED_AT: repr(time.time()),
        JobField.REQUEST: request.model_dump_json(),
    }
    call = scripts.submit(
        job_id,
        fields=fields,
        rq_job=records.queued(job_id, "job"),
        queue_list=queue.key,
        max_queued=0,
        life=600,
        maxlen=100,
        queued_event=Queued(model=model),
        quota=None,
        now=time.time(),
    )
    JobScripts(connection).run(call)
    return queue, job_id


@pytest.mark.parametrize("before", ["nothing", "a-janitor", "rq-prepared-it"])
def test_a_job_taken_as_the_worker_stops_goes_back_to_its_queue_once(
    redis_server: RedisServer, before: str
) -> None:
    """The dispatcher's wait on the queue brings a job just as the worker is told to stop: the job
    is not started, and it is queued once again (not lost, not twice), in streamq and in RQ. Also
    when a janitor found it taken on two rounds and queued it again first (a worker slow to get to
    it): it was then on its queue twice, and a second worker took a job already taken. And when
    RQ's own worker loop (a plain `rq worker`) took it off the taken list before the run."""
    model = unique("rq-stopping")
    connection = redis_server.client()
    queue, job_id = submitted(connection, model)
    runs = RqRuns(
        connection, SimpleWorker([queue], name=model, connection=connection), result_ttl=600, job_timeout=300
    )
    (run,) = runs.begin(runs.take(4, wait=1))
    settings = Settings()
    if before == "a-janitor":
        stranded = StrandedJobs(connection, settings)
        assert stranded.sweep() == [] and stranded.sweep() == [job_id]
    elif before == "rq-prepared-it":  # as its prepare_job_execution does, for one queue
        connection.lrem(keys.intermediate(queue.key), 1, job_id)
    runner = JobRunner(connection, StoppingEngine(), None, settings, None, None, model)  # type: ignore[arg-type]
    outcome = runner.run(job_id, f"{model}.0", run.fields)
    runs.end(run, outcome)
    assert outcome is Outcome.REQUEUED
    assert queue.job_ids == [job_id] and connection.llen(keys.intermediate(queue.key)) == 0
    assert connection.hget(keys.job(job_id), JobField.STATUS) == StreamqStatus.QUEUED.encode()
    assert Job.fetch(job_id, connection=connection).get_status() == "queued"
    assert StartedJobRegistry(queue=queue).get_job_ids() == []


def _take_all(redis_server: RedisServer, queue_key: str, taken: list[str], seconds: float) -> None:
    """A dispatcher with free slots: each id off the queue, and straight back to wait for more,
    for half a second after the first (it never starts them: a janitor's rounds would find one
    parked and queue it again after a second or two, as they should)."""
    connection = redis_server.client(decode_responses=True)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        job_id = connection.blmove(queue_key, keys.intermediate(queue_key), 1, "LEFT", "RIGHT")
        if job_id is not None:
            if not taken:
                deadline = time.monotonic() + 0.5
            taken.append(str(job_id))


def test_a_job_started_as_the_engine_stops_is_handed_back_by_its_own_thread(
    redis_server: RedisServer,
) -> None:
    """The engine took its last arrivals and stopped while a job's thread was still starting the
    job (its start script, its prompt: a grammar can take seconds): the engine refuses the job,
    and the thread hands it back to its queue, fenced by its run, at once. It was left unread, and
    the job failed after a minute of waiting, or was ended lost by a janitor."""
    model = unique("rq-closing")
    connection = redis_server.client()
    queue, job_id = submitted(connection, model)
    settings = Settings(redis_url=redis_server.url, backend="synthetic", served_name=model)
    runtime = build_runtime(settings, connection, model)
    runtime.start()
    try:
        runtime.engine.stop()  # it stopped after the runner asked whether it was stopping:
        runtime.engine.stopping = lambda: False  # type: ignore[method-assign]
        runs = RqRuns(
            connection,
            SimpleWorker([queue], name=model, connection=connection),
            result_ttl=600,
            job_timeout=300,
        )
        (run,) = runs.begin(runs.take(4, wait=1))
        taken: list[str] = []  # what a worker waiting on the queue gets, taking again at once
        waiting = threading.Thread(target=_take_all, args=(redis_server, queue.key, taken, 3.0))
        waiting.start()
        began = time.monotonic()
        outcome = runtime.run_job(job_id, f"{model}.0", run.fields)
        runs.end(run, outcome)
        waiting.join()
    finally:
        runtime.stop()
    assert outcome is Outcome.REQUEUED and time.monotonic() - began < 5
    assert taken == [job_id]  # once: RQ's record pushed no second copy (it was taken twice)
    connection.lmove(keys.intermediate(queue.key), queue.key, "RIGHT", "LEFT")
    assert queue.job_ids == [job_id] and connection.llen(keys.intermediate(queue.key)) == 0
    state = connection.hmget(keys.job(job_id), [JobField.STATUS, JobField.ATTEMPTS])
    assert state == [StreamqStatus.QUEUED.encode(), b"0"]  # its attempt given back
    assert Job.fetch(job_id, connection=connection).get_status() == "queued"


def test_a_job_that_ended_has_no_lease_left_to_renew(redis_server: RedisServer) -> None:
    """Its run's lease is let go at its end: kept, the lease keeper renewed it every second for as
    long as the worker lived (and the job's lease key came back after its end deleted it)."""
    model = unique("rq-leases")
    connection = redis_server.client()
    queue, job_id = submitted(connection, model)
    settings = Settings(redis_url=redis_server.url, backend="synthetic", served_name=model)
    runtime = build_runtime(settings, connection, model)
    runtime.start()
    try:
        runs = RqRuns(
            connection,
            SimpleWorker([queue], name=model, connection=connection),
            result_ttl=600,
            job_timeout=300,
        )
        (run,) = runs.begin(runs.take(4, wait=1))
        outcome = runtime.run_job(job_id, f"{model}.0", run.fields)
        runs.end(run, outcome)
        assert outcome is Outcome.FINISHED
        runtime.leases.renew()
        assert not connection.exists(keys.lease(job_id))
        assert job_id not in runtime.leases._jobs
    finally:
        runtime.stop()
