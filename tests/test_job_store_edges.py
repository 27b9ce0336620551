"""The job store's edges against a real Redis, each a change a mutation test found no test
would notice: a withdrawn job forgotten only once it has ended (and the key sent again meanwhile
told to wait), fronts that follow a new idempotency secret, a cancel told to its run by its next
write, a run the janitor ended that writes nothing more, a job continued after a single token, a
job's first start time kept over its runs, a job RQ failed left alone while its lease lives,
live workers kept by the janitor, a lost job back at its queue's front (with or without RQ's
record of it), and a key's quota that forgets jobs whose records expired."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
import redis.asyncio as aioredis

from api.errors import ApiError
from api.idempotency import Idempotent
from api.idempotent_jobs import IdempotentJobs, forget
from harness.redis_server import RedisServer
from shared import keys
from shared.job_store import scripts
from shared.job_store.scripts import DeltaAnswer, JobScripts
from shared.job_store.vocabulary import JobField, JobStatus
from shared.settings import Settings
from tests.job_scripts import _delta, _events, _finish, _new_job, _requeue, _run, _start


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    """A Redis of this module's own: the janitor and the stranded-jobs sweep here act on every
    job they find, and the session's Redis holds other modules' jobs."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


def test_a_withdrawn_job_is_forgotten_only_once_it_has_ended(redis_server: RedisServer) -> None:
    """Forgetting a withdrawn job that still runs would delete its records under its worker, and
    the key sent again would make a second run of the same job."""
    r = redis_server.client(decode_responses=True)
    _new_job(r, "je-withdrawn")
    assert _start(r, "je-withdrawn", "run-1") == "running"
    withdrawn = scripts.cancel("je-withdrawn", "m", ttl=60, maxlen=100, withdrawn=True)
    assert scripts.answer(_run(r, withdrawn)) == "running"
    assert _run(r, forget("je-withdrawn", "m")) == -1
    assert r.exists(keys.job("je-withdrawn"), keys.events("je-withdrawn")) == 2
    assert _finish(r, "je-withdrawn", scripts.ended_canceled(0), "run-1") == "ok"
    assert _run(r, forget("je-withdrawn", "m")) == 1
    assert r.exists(keys.job("je-withdrawn"), keys.events("je-withdrawn"), keys.text("je-withdrawn")) == 0


def test_a_key_sent_again_while_its_withdrawn_job_stops_waits_then_makes_it_anew(
    redis_server: RedisServer,
) -> None:
    async def run() -> None:
        connection = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        jobs = IdempotentJobs(connection, JobScripts(connection))
        asked = Idempotent(key="je-key-1", fingerprint="request-1")
        job_id, exists = await jobs.find(asked, "owner")
        assert not exists
        await connection.hset(
            keys.job(job_id),
            mapping={
                JobField.STATUS: JobStatus.RUNNING,
                JobField.WITHDRAWN: "1",
                JobField.FINGERPRINT: "request-1",
                JobField.MODEL: "m",
            },
        )
        with pytest.raises(ApiError) as stopping:  # not a 202 for a job about to end canceled
            await jobs.find(asked, "owner")
        assert stopping.value.status == 503 and stopping.value.headers == {"Retry-After": "1"}
        await connection.hset(keys.job(job_id), JobField.STATUS, JobStatus.CANCELED)
        assert await jobs.find(asked, "owner") == (job_id, False)  # forgotten: made anew
        await connection.aclose()

    asyncio.run(run())


def test_every_front_follows_a_new_idempotency_secret(redis_server: RedisServer) -> None:
    """After Redis restarts empty, the first front to need a secret makes one; a front that kept
    the old one would give the same key another job id: two jobs for one request."""

    async def run() -> None:
        connections = [aioredis.Redis.from_url(redis_server.url, decode_responses=True) for _ in range(2)]
        a, b = (IdempotentJobs(c, JobScripts(c)) for c in connections)
        asked = Idempotent(key="je-key-2", fingerprint="request-2")
        before, _ = await a.find(asked, "owner")  # a keeps the secret
        await connections[0].set(keys.IDEMPOTENCY_SECRET, "another secret")
        after, _ = await b.find(asked, "owner")
        assert after != before and (await a.find(asked, "owner"))[0] == after
        for connection in connections:
            await connection.aclose()

    asyncio.run(run())


def test_a_run_hears_of_a_cancel_from_its_next_write(redis_server: RedisServer) -> None:
    """The pub/sub message is not all: a cancel asked before the run watched for it, or while its
    subscription reconnected, is answered by the run's next write."""
    r = redis_server.client(decode_responses=True)
    _new_job(r, "je-cancel")
    assert _start(r, "je-cancel", "run-1") == "running"
    assert scripts.answer(_run(r, scripts.cancel("je-cancel", "m", ttl=60, maxlen=100))) == "running"
    assert _delta(r, "je-cancel", "run-1", "Hi", [11]) == DeltaAnswer.CANCEL_ASKED


@pytest.mark.parametrize("cancel", [False, True])
def test_a_run_the_janitor_ended_writes_nothing_more(redis_server: RedisServer, cancel: bool) -> None:
    """A frozen worker wakes after the janitor failed (or canceled) its job: its writes are
    refused, after the final event as before it."""
    r = redis_server.client(decode_responses=True)
    job_id = f"je-ended-{cancel}"
    _new_job(r, job_id)
    assert _start(r, job_id, "run-a") == "running"
    assert _delta(r, job_id, "run-a", "Hello", [11]) == 0
    if cancel:
        assert scripts.answer(_run(r, scripts.cancel(job_id, "m", ttl=60, maxlen=100))) == "running"
    r.delete(keys.lease(job_id))
    assert _requeue(r, job_id, attempts=1) == ("canceled" if cancel else "failed")
    final = _events(r, job_id)[-1]
    assert _delta(r, job_id, "run-a", " late", [12]) == -1
    assert r.get(keys.text(job_id)) == "Hello" and _events(r, job_id)[-1] == final
    assert not r.exists(keys.tokens(job_id))


def test_a_job_continued_after_a_single_token_goes_on_from_it(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    _new_job(r, "je-one")
    assert _start(r, "je-one", "run-1") == "running"
    assert _delta(r, "je-one", "run-1", "Hi", [11]) == 0
    r.delete(keys.lease("je-one"))
    assert _requeue(r, "je-one") == "requeued"
    again = scripts.started(_run(r, _start_call_at("je-one", "run-2", 2.0)))
    assert again == ("running", [11]) and r.hget(keys.job("je-one"), JobField.STORED_TOKENS) == "1"


def _start_call_at(job_id: str, run: str, now: float) -> scripts.ScriptCall:
    return scripts.start(
        job_id, worker="w1", slot="w1.0", run=run, now=now, attempt=1, lease_ms=5000, maxlen=100
    )


def test_a_job_keeps_its_first_start_time_over_its_runs(redis_server: RedisServer) -> None:
    """Its view's started_at, and the timeout that counts from it: a later run's start would let
    a job handed back twice run past its timeout."""
    r = redis_server.client(decode_responses=True)
    _new_job(r, "je-first")
    for attempt, now in enumerate((1.0, 5.0, 9.0), start=1):
        assert scripts.started(_run(r, _start_call_at("je-first", f"run-{attempt}", now)))[0] == "running"
        assert r.hget(keys.job("je-first"), JobField.STARTED_AT) == "1.0"
        r.delete(keys.lease("je-first"))
        assert _requeue(r, "je-first", attempts=5) == "requeued"


def test_a_job_rq_failed_is_left_to_its_run_while_its_lease_lives(redis_server: RedisServer) -> None:
    """RQ's maintenance fails a stale execution of a job a worker runs: streamq ends it only once
    its lease has lapsed, not under a live worker."""
    from rq.queue import Queue
    from rq.registry import FailedJobRegistry

    from shared.stranded_jobs import StrandedJobs

    r = redis_server.client(decode_responses=True)
    _new_job(r, "je-rq-failed", "rq-failed-model")
    r.delete(keys.rq_queue("rq-failed-model"))
    r.sadd(keys.RQ_QUEUES, keys.rq_queue("rq-failed-model"))
    assert _start(r, "je-rq-failed", "run-1") == "running"
    queue = Queue(keys.queue_name("rq-failed-model"), connection=redis_server.client())
    failed = FailedJobRegistry(queue=queue).key
    stranded = StrandedJobs(redis_server.client(), Settings(redis_url=redis_server.url))
    r.zadd(failed, {"je-rq-failed": time.time()})
    stranded.sweep()
    assert r.hget(keys.job("je-rq-failed"), JobField.STATUS) == JobStatus.RUNNING
    r.delete(keys.lease("je-rq-failed"))
    r.zadd(failed, {"je-rq-failed": time.time() + 1})  # failed again, after its lease lapsed
    stranded.sweep()
    assert r.hget(keys.job("je-rq-failed"), JobField.STATUS) == JobStatus.FAILED


def test_the_janitor_forgets_only_workers_whose_heartbeat_stopped(redis_server: RedisServer) -> None:
    from shared.janitor import Janitor

    r = redis_server.client(decode_responses=True)
    settings = Settings(redis_url=redis_server.url)
    now = time.time()
    r.zadd(keys.WORKERS, {"je-live": now, "je-dead": now - settings.worker_ttl - 10})
    for name in ("je-live", "je-dead"):
        r.hset(keys.worker(name), "model", "m")
    Janitor(redis_server.client(), settings).forget_dead_workers()
    assert r.zscore(keys.WORKERS, "je-live") is not None and r.exists(keys.worker("je-live"))
    assert r.zscore(keys.WORKERS, "je-dead") is None and not r.exists(keys.worker("je-dead"))
    r.zrem(keys.WORKERS, "je-live")
    r.delete(keys.worker("je-live"))


def test_a_lost_job_goes_back_to_its_queues_front(redis_server: RedisServer) -> None:
    from rq.queue import Queue

    from shared.janitor import Janitor
    from worker.tasks import TASK

    r = redis_server.client(decode_responses=True)
    queue = Queue(keys.queue_name("front-model"), connection=redis_server.client())
    _new_job(r, "je-lost", "front-model")
    r.delete(keys.rq_queue("front-model"))
    queue.enqueue_call(TASK, args=("je-lost",), job_id="je-lost", result_ttl=600)
    r.lpop(queue.key)  # a worker took it and started it; then its worker died
    assert _start(r, "je-lost", "run-1") == "running"
    queue.enqueue_call(TASK, args=("je-waiting",), job_id="je-waiting", result_ttl=600)
    r.delete(keys.lease("je-lost"))
    janitor = Janitor(redis_server.client(), Settings(redis_url=redis_server.url))
    assert "je-lost" in janitor.requeue_orphans()
    assert r.lrange(queue.key, 0, -1) == ["je-lost", "je-waiting"]  # once, ahead of the waiting one
    r.delete(queue.key)


def test_the_janitor_requeues_nothing_just_after_redis_failed(redis_server: RedisServer) -> None:
    """Leases lapsed during an outage although their workers live: they renew them within a
    renewal period of Redis coming back, so the janitor waits that long before trusting them."""
    from shared.janitor import Janitor

    r = redis_server.client(decode_responses=True)
    _new_job(r, "je-outage")
    r.lrem(keys.rq_queue("m"), 1, "je-outage")
    assert _start(r, "je-outage", "run-1") == "running"
    r.delete(keys.lease("je-outage"))
    settings = Settings(redis_url=redis_server.url)
    janitor = Janitor(redis_server.client(), settings)
    janitor._redis_failed_at = time.monotonic()
    assert janitor.requeue_orphans() == []
    janitor._redis_failed_at -= settings.lease_seconds + 2 * settings.lease_renew_seconds
    assert "je-outage" in janitor.requeue_orphans()


def test_a_keys_quota_forgets_jobs_whose_records_expired(redis_server: RedisServer) -> None:
    """The key's set of active jobs outlives them (its TTL renewed at each admission): a job whose
    hash expired would hold one of the key's slots for good."""
    from api.quotas import KeyQuotas

    async def run() -> None:
        connection = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        quotas = KeyQuotas(Settings(redis_url=redis_server.url, key_max_concurrent=2), connection, "test")
        await connection.zadd(keys.key_active("je-key"), {"je-expired": 1})
        assert await quotas.prune("je-key")
        assert await connection.zcard(keys.key_active("je-key")) == 0
        await quotas.close()
        await connection.aclose()

    asyncio.run(run())


def test_a_lost_job_without_its_rq_record_goes_back_on_its_models_queue(redis_server: RedisServer) -> None:
    """RQ's record can go (a failover lost it; the worker that ran the job anyway died): the job
    goes back on its model's queue all the same, not queued with its id on no list."""
    from shared.janitor import Janitor

    r = redis_server.client(decode_responses=True)
    _new_job(r, "je-no-record", "no-record-model")
    r.delete(keys.rq_queue("no-record-model"))
    assert _start(r, "je-no-record", "run-1") == "running"
    r.delete(keys.lease("je-no-record"))
    janitor = Janitor(redis_server.client(), Settings(redis_url=redis_server.url))
    assert "je-no-record" in janitor.requeue_orphans()
    assert r.hget(keys.job("je-no-record"), JobField.STATUS) == JobStatus.QUEUED
    assert r.lrange(keys.rq_queue("no-record-model"), 0, -1) == ["je-no-record"]


def test_an_ended_jobs_id_left_in_a_workers_intermediate_list_is_dropped(redis_server: RedisServer) -> None:
    """A job that ended while its id was parked (canceled, failed by the janitor) leaves nothing
    there for every later round to read again."""
    from shared.stranded_jobs import StrandedJobs

    r = redis_server.client(decode_responses=True)
    _new_job(r, "je-parked", "parked-model")
    r.delete(keys.rq_queue("parked-model"))
    r.sadd(keys.RQ_QUEUES, keys.rq_queue("parked-model"))
    parked = keys.intermediate(keys.rq_queue("parked-model"))
    r.rpush(parked, "je-parked")
    r.hset(keys.job("je-parked"), JobField.STATUS, JobStatus.CANCELED)
    stranded = StrandedJobs(redis_server.client(), Settings(redis_url=redis_server.url))
    stranded.sweep()  # first seen: a live worker may still start it
    stranded.sweep()
    assert r.llen(parked) == 0 and r.llen(keys.rq_queue("parked-model")) == 0


def test_the_janitor_leaves_a_job_whose_lease_lives_and_rqs_record_of_its_run(
    redis_server: RedisServer,
) -> None:
    """Only a lapsed lease makes a job lost: a live run's job stays off its queue, and RQ's record
    of the run (started, in the started registry) is left as its worker wrote it."""
    from rq.executions import Execution
    from rq.job import Job
    from rq.queue import Queue
    from rq.registry import StartedJobRegistry

    from shared.janitor import Janitor
    from worker.tasks import TASK

    r = redis_server.client(decode_responses=True)
    queue = Queue(keys.queue_name("live-model"), connection=redis_server.client())
    _new_job(r, "je-live-run", "live-model")
    r.delete(keys.rq_queue("live-model"))
    job = queue.enqueue_call(TASK, args=("je-live-run",), job_id="je-live-run", result_ttl=600)
    r.lpop(queue.key)
    with redis_server.client().pipeline() as pipe:  # as a worker's start of its run files it
        Execution.create(job, 600, pipeline=pipe, worker_name="w")
        job.prepare_for_execution("w", pipeline=pipe)
        pipe.execute()
    assert _start(r, "je-live-run", "run-1", lease_ms=60_000) == "running"
    janitor = Janitor(redis_server.client(), Settings(redis_url=redis_server.url))
    for _ in range(2):
        assert "je-live-run" not in janitor.requeue_orphans()
    assert r.llen(queue.key) == 0 and r.hget(keys.job("je-live-run"), JobField.STATUS) == JobStatus.RUNNING
    assert Job.fetch("je-live-run", connection=redis_server.client()).get_status() == "started"
    assert "je-live-run" in StartedJobRegistry(queue=queue).get_job_ids()


@pytest.mark.parametrize("attempts", [1, 2])
def test_a_worker_waiting_on_the_queue_never_takes_a_lost_job_before_the_janitor_queues_it(
    redis_server: RedisServer, attempts: int
) -> None:
    """A worker blocked on the queue takes an id the moment it is pushed. The janitor pushed a
    lost job's id before its script queued the job again: a worker took it and started it at
    once, a second start with no "requeued" event, and with its attempts spent a job that kills
    its workers ran again (seen once in a vLLM soak). The janitor's next command is slowed here,
    so a worker is always first to whatever it can see."""
    import threading

    from rq.job import Job
    from rq.queue import Queue
    from rq.registry import StartedJobRegistry

    from shared.janitor import Janitor
    from shared.settings import Settings
    from worker.tasks import TASK

    r = redis_server.client(decode_responses=True)
    job_id, model = f"js-lost-{attempts}", f"lost-model-{attempts}"
    queue = Queue(keys.queue_name(model), connection=redis_server.client())
    _new_job(r, job_id, model)
    r.delete(keys.rq_queue(model))
    queue.enqueue_call(TASK, args=(job_id,), job_id=job_id, result_ttl=600)
    r.lpop(queue.key)  # a worker took it and started it; then its worker died
    assert _start(r, job_id, "run-1") == "running"
    r.delete(keys.lease(job_id))
    started: list[str] = []

    def waiting_worker() -> None:  # as the dispatcher: the id off the queue, then the job's start
        taken = redis_server.client().blmove(queue.key, keys.intermediate(queue.key), 3, "LEFT", "RIGHT")
        if taken is not None:
            started.append(_start(r, job_id, "run-2"))
            # and straight back to the queue, as a dispatcher with another free slot goes
            again = redis_server.client().blmove(queue.key, keys.intermediate(queue.key), 1, "LEFT", "RIGHT")
            started.append("taken twice" if again is not None else "once")

    worker = threading.Thread(target=waiting_worker)
    worker.start()
    time.sleep(0.2)  # blocked on the queue
    janitor = Janitor(redis_server.client(), Settings(redis_url=redis_server.url, max_attempts=attempts))
    run = janitor._scripts.run

    def slowed(*args: object, **kwargs: object) -> object:
        time.sleep(0.5)
        return run(*args, **kwargs)  # type: ignore[arg-type]

    janitor._scripts.run = slowed  # type: ignore[method-assign]
    janitor.requeue_orphans()
    worker.join()
    if attempts == 1:  # spent: failed, and never started again
        assert started == [] and r.hget(keys.job(job_id), JobField.STATUS) == JobStatus.FAILED
        assert _events(r, job_id) == ["started", "error"]
    else:  # queued again, then taken: its stream says so
        assert started == ["running", "once"] and _events(r, job_id) == ["started", "queued", "started"]
        assert r.hget(keys.job(job_id), JobField.ATTEMPTS) == "2"
        assert r.llen(queue.key) == 0  # delivered once: RQ's record was written, its id not pushed
        assert Job.fetch(job_id, connection=redis_server.client()).get_status() == "queued"  # before the take
        assert not StartedJobRegistry(queue=queue).get_job_ids()  # the dead run's execution is gone
