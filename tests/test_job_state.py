"""The job store's Lua scripts against a real Redis, called exactly as production calls them
(through the typed builders of ``shared.job_store.scripts``): a job ends exactly once, and
only the run that holds a job writes to it."""

from __future__ import annotations

import re
import time

import pytest
import redis

from harness.redis_server import RedisServer
from shared import keys
from shared.job_store import scripts
from shared.job_store.scripts import Answer, DeltaAnswer, JobScripts, RenewAnswer
from shared.job_store.vocabulary import EventName, FinishReason, JobField, JobStatus
from shared.logprobs import TokenLogprob
from tests.job_scripts import (
    _cancel,
    _delta,
    _done,
    _events,
    _finish,
    _new_job,
    _requeue,
    _run,
    _start,
    _start_call,
)
from tests.redis_replies import decoded_entries
from worker.step_publisher import final_record


def test_a_job_ends_once_and_a_late_finish_changes_nothing(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    job_keys = _new_job(r, "js1")
    assert _start(r, "js1", "run-a") == "running"
    assert r.zscore(keys.RUNNING, "js1") is not None and r.get(keys.lease("js1")) == "run-a"
    assert _finish(r, "js1", _done(), "run-a") == "ok"
    assert _finish(r, "js1", scripts.ended_canceled(0), "run-a") == "finished"
    assert r.hget(job_keys[0], "status") == "finished" and r.hget(job_keys[0], "finish_reason") == "stop"
    assert _events(r, "js1") == ["started", "done"]
    assert all(0 < r.ttl(k) <= 60 for k in job_keys[:2])
    assert r.zscore(keys.RUNNING, "js1") is None and not r.exists(keys.lease("js1"))


def test_cancel_ends_a_job_no_run_holds_and_flags_a_running_one(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    queued = _new_job(r, "js2")
    assert _cancel(r, "js2") == "ok"
    assert r.lpos(keys.rq_queue("m"), "js2") is None
    assert r.hget(queued[0], "status") == "canceled" and _events(r, "js2") == ["canceled"]
    # A worker that had already popped it finds it canceled and does not start it.
    assert _start(r, "js2", "run-b") == "canceled"

    # Taken by a worker (RQ's BLMOVE into the intermediate list) that has not started it, or that
    # died before it could: no run holds it, so the cancel ends it here and now.
    taken = _new_job(r, "js9")
    intermediate = keys.intermediate(keys.rq_queue("m"))
    r.lrem(keys.rq_queue("m"), 1, "js9")  # (not LMOVE: the queue may hold earlier tests' jobs)
    r.rpush(intermediate, "js9")
    assert _cancel(r, "js9") == "ok"
    assert r.hget(taken[0], "status") == "canceled" and _events(r, "js9") == ["canceled"]
    assert r.lpos(intermediate, "js9") is None
    assert _start(r, "js9", "run-e") == "canceled"  # the worker, should it wake, leaves it

    running = _new_job(r, "js3")
    r.lrem(keys.rq_queue("m"), 1, "js3")  # a worker took it and started it
    assert _start(r, "js3", "run-c") == "running"
    assert _cancel(r, "js3") == "running"
    assert r.hget(running[0], "cancel") == "1" and r.hget(running[0], "status") == "running"

    assert _cancel(r, "js2") == "canceled"
    assert _cancel(r, "none") == "missing"


def test_only_the_run_holding_a_job_writes_to_it(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    _new_job(r, "js4")
    assert _start(r, "js4", "run-old") == "running"
    assert _delta(r, "js4", "run-old", "Hello", [11, 12]) == 0
    assert r.lrange(keys.tokens("js4"), 0, -1) == ["11", "12"] and r.ttl(keys.tokens("js4")) > 0
    # Its lease lapses (the worker froze); the janitor hands the job back; another run starts it.
    r.delete(keys.lease("js4"))
    assert _requeue(r, "js4") == "requeued"
    assert r.hget(keys.job("js4"), "status") == "queued"
    assert _start(r, "js4", "run-new") == "running" and r.hget(keys.job("js4"), "attempts") == "2"
    # The same start sent again (its reply was lost with a connection): it holds the job, once,
    # with the earlier run's token ids; the old run's start, sent now, finds the job taken.
    again = scripts.started(_run(r, _start_call("js4", "run-new")))
    assert again == ("running", [11, 12]) and r.hget(keys.job("js4"), "attempts") == "2"
    assert _start(r, "js4", "run-old") == "taken"
    # The old run wakes up: it can neither write nor renew nor finish.
    assert _delta(r, "js4", "run-old", " stale", [99]) == -1
    assert _run(r, scripts.renew("js4", run="run-old", lease_ms=5000)) == RenewAnswer.TAKEN
    assert _finish(r, "js4", _done(), "run-old") == "lost"
    assert _delta(r, "js4", "run-new", " world", [13]) == 0
    assert r.get(keys.text("js4")) == "Hello world"
    assert r.lrange(keys.tokens("js4"), 0, -1) == ["11", "12", "13"]
    assert _events(r, "js4") == ["started", "delta", "queued", "started", "delta"]


def test_a_job_whose_worker_keeps_dying_fails_after_its_attempts(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    _new_job(r, "js5")
    for attempt in (1, 2):
        assert _start(r, "js5", f"run-{attempt}") == "running"
        assert _requeue(r, "js5", attempts=2) == "alive"  # the lease is live: leave it
        r.delete(keys.lease("js5"))
        assert _requeue(r, "js5", attempts=2) == ("requeued" if attempt == 1 else "failed")
    state = r.hgetall(keys.job("js5"))
    assert (state["status"], state["error_type"]) == ("failed", "worker_lost")
    assert _events(r, "js5")[-1] == "error" and r.zscore(keys.RUNNING, "js5") is None


def test_a_dead_workers_job_ends_as_its_run_would_have_ended_it(redis_server: RedisServer) -> None:
    """Canceled while its worker died, or failed once its attempts are spent, the job the janitor
    ends has what a run's own end gives it: its finished_at, the canceled event's token count,
    its text and events kept for the TTL, and its token ids dropped."""
    import json

    r = redis_server.client(decode_responses=True)
    for job_id, cancel in (("js-dead-cancel", True), ("js-dead-fail", False)):
        _new_job(r, job_id)
        assert _start(r, job_id, "run-1") == "running"
        assert _delta(r, job_id, "run-1", "Hello", [11, 12]) == 0
        if cancel:
            assert _cancel(r, job_id) == "running"  # flagged: its worker died before it saw it
        r.delete(keys.lease(job_id))
        assert _requeue(r, job_id, attempts=1) == ("canceled" if cancel else "failed")
        state = r.hgetall(keys.job(job_id))
        assert float(state[JobField.FINISHED_AT]) > 0, state
        assert state[JobField.FINISH_REASON] == ("canceled" if cancel else "error")
        (_, last), *_ = decoded_entries(r.xrevrange(keys.events(job_id), count=1))
        if cancel:
            assert (last["event"], json.loads(last["data"])) == ("canceled", {"completion_tokens": 2})
        else:
            assert last["event"] == "error" and json.loads(last["data"])["type"] == "worker_lost"
        assert r.get(keys.text(job_id)) == "Hello" and 0 < r.ttl(keys.text(job_id)) <= 60
        assert not r.exists(keys.tokens(job_id))


def test_a_running_job_whose_record_is_gone_or_ended_leaves_the_running_set_once(
    redis_server: RedisServer,
) -> None:
    """A job on the running set with no lease whose hash expired (or Redis lost it), or that
    ended without leaving the set: the janitor's requeue takes it off, and the janitor does not
    queue it again in RQ (it came back at every round, a copy on the queue each time)."""
    from rq.queue import Queue

    from shared.janitor import Janitor
    from shared.settings import Settings
    from worker.tasks import TASK

    r = redis_server.client()
    for job_id, model in (("js-gone", "gone-model"), ("js-ended", "ended-model")):
        queue = Queue(keys.queue_name(model), connection=r)
        queue.enqueue_call(TASK, args=(job_id,), job_id=job_id, result_ttl=600)
        r.lpop(queue.key)  # a worker took it and started it; then its worker died
        r.zadd(keys.RUNNING, {job_id: 1})
    r.hset(keys.job("js-ended"), mapping={"status": "finished"})  # and js-gone has no hash left
    janitor = Janitor(r, Settings(redis_url=redis_server.url))
    for _ in range(3):
        janitor.sweep()
    assert r.zscore(keys.RUNNING, "js-gone") is None and r.zscore(keys.RUNNING, "js-ended") is None
    assert r.llen(keys.rq_queue("gone-model")) == 0 and r.llen(keys.rq_queue("ended-model")) == 0
    r.delete(keys.job("js-ended"))


def test_a_job_the_janitor_fails_leaves_its_rq_queue_and_rq_records_it_failed(
    redis_server: RedisServer,
) -> None:
    """The janitor puts a job whose worker died back on its RQ queue before its script decides;
    one whose attempts were spent ended failed but stayed on the queue: counted in its depth and
    load with no worker left, and counted failed again by the next worker that took it."""
    from rq.job import Job
    from rq.queue import Queue
    from rq.registry import FailedJobRegistry

    from shared.janitor import Janitor
    from shared.settings import Settings
    from worker.tasks import TASK

    r = redis_server.client(decode_responses=True)
    queue = Queue(keys.queue_name("spent-model"), connection=redis_server.client())
    _new_job(r, "js-spent", "spent-model")
    r.delete(keys.rq_queue("spent-model"))
    queue.enqueue_call(TASK, args=("js-spent",), job_id="js-spent", result_ttl=600)
    r.lpop(queue.key)  # a worker took it and started it; then its worker died
    assert _start(r, "js-spent", "run-1") == "running"
    r.delete(keys.lease("js-spent"))
    janitor = Janitor(redis_server.client(), Settings(redis_url=redis_server.url, max_attempts=1))
    janitor.sweep()
    assert r.hget(keys.job("js-spent"), JobField.STATUS) == JobStatus.FAILED
    assert r.llen(queue.key) == 0  # not "waiting" for a worker
    assert Job.fetch("js-spent", connection=redis_server.client()).get_status() == "failed"
    assert "js-spent" in FailedJobRegistry(queue=queue).get_job_ids()
    # One whose cancel its dead worker never saw: canceled, off the queue, canceled in RQ too.
    _new_job(r, "js-asked", "spent-model")
    r.lrem(queue.key, 0, "js-asked")
    queue.enqueue_call(TASK, args=("js-asked",), job_id="js-asked", result_ttl=600)
    r.lpop(queue.key)
    assert _start(r, "js-asked", "run-1") == "running"
    assert _cancel(r, "js-asked", "spent-model") == "running"  # flagged: its worker should stop it
    r.delete(keys.lease("js-asked"))
    janitor.sweep()
    assert r.hget(keys.job("js-asked"), JobField.STATUS) == JobStatus.CANCELED
    assert r.llen(queue.key) == 0
    assert Job.fetch("js-asked", connection=redis_server.client()).get_status() == "canceled"
    # Both records kept as long as streamq's (RQ's own cancel kept the job for ever, its
    # registry entry not at all), and the failed one's likewise.
    from rq.registry import CanceledJobRegistry

    ttl = Settings().result_ttl
    for job_id, registry in (("js-asked", CanceledJobRegistry), ("js-spent", FailedJobRegistry)):
        assert 0 < r.ttl(f"rq:job:{job_id}") <= ttl, job_id
        score = r.zscore(registry(queue=queue).key, job_id)
        assert score is not None and score > time.time() + ttl - 60, job_id


def test_one_janitor_holds_the_lock_and_one_whose_lock_lapsed_stops_its_round() -> None:
    """Janitors of every front and worker share one lock. One whose lock lapsed (a round longer
    than the lock's three rounds, a pause) and went to another neither renews the other's lock
    (a holder check then an expiry, two steps, could) nor requeues any more jobs in its round (two
    janitors requeueing the same lapsed job put it on its queue twice)."""
    from shared.janitor import Janitor
    from shared.settings import Settings

    server = RedisServer()  # its own: the lock is one key for all, and other tests' janitors hold it
    try:
        r = server.client(decode_responses=True)
        settings = Settings(redis_url=server.url, janitor_interval=5.0)
        first, second = Janitor(r, settings), Janitor(r, settings)
        assert first._lock() and not second._lock() and first._lock()
        r.delete(keys.JANITOR_LOCK)  # the first's lock lapsed
        assert second._lock()
        held, ttl = r.get(keys.JANITOR_LOCK), r.pttl(keys.JANITOR_LOCK)
        r.pexpire(keys.JANITOR_LOCK, 4000)
        assert not first._lock()
        assert r.get(keys.JANITOR_LOCK) == held and r.pttl(keys.JANITOR_LOCK) <= 4000 < ttl
        for job_id in ("js-lapsed-1", "js-lapsed-2"):
            _new_job(r, job_id)
            assert _start(r, job_id, f"run-{job_id}") == "running"
            r.delete(keys.lease(job_id))  # its worker died
        asked: list[int] = []

        def asked_and_lost() -> bool:
            asked.append(1)
            return False

        assert first.requeue_orphans(still_ours=asked_and_lost) == []
        assert asked == [1] and r.zcard(keys.RUNNING) == 2  # it stopped at the first job
        assert sorted(second.requeue_orphans()) == ["js-lapsed-1", "js-lapsed-2"]
        # Within two rounds of its renewal a janitor goes on without asking Redis; later it asks.
        assert second._still_ours()
        second._renewed_at -= 2 * settings.janitor_interval
        assert second._still_ours() and r.pttl(keys.JANITOR_LOCK) > 14_000  # renewed: 15 s again
        first._renewed_at -= 2 * settings.janitor_interval
        assert not first._still_ours()
    finally:
        server.close()


def test_a_handback_puts_the_job_back_on_its_queue_in_the_same_step(redis_server: RedisServer) -> None:
    """A stopping worker's handback leaves no window where the job is queued in streamq but on no
    RQ list: the script itself pushes it to the queue's front (RQ's enqueue then writes its record)."""
    r = redis_server.client(decode_responses=True)
    _new_job(r, "js7", model="hb")
    r.lrem(keys.rq_queue("hb"), 1, "js7")  # a worker took it
    assert _start(r, "js7", "run-h") == "running"
    r.rpush(keys.rq_queue("hb"), "other")
    assert _requeue(r, "js7", run="run-h", queue=keys.rq_queue("hb")) == "requeued"
    assert r.hget(keys.job("js7"), "status") == "queued"
    assert r.lrange(keys.rq_queue("hb"), 0, -1) == ["js7", "other"]
    # Its record gone (expired, or Redis came back empty): the run is told so, not "taken".
    r.delete(keys.job("js7"))
    assert _run(r, scripts.renew("js7", run="run-h", lease_ms=5000)) == RenewAnswer.GONE


def test_every_word_the_scripts_use_is_in_the_vocabulary() -> None:
    """The scripts' string literals are Redis commands, or the job store's own words (fields,
    statuses, events, answers): a field renamed in one place and not the other fails here."""
    words = {*JobField, *JobStatus, *EventName, *FinishReason, *Answer}
    commands = {"HGET", "HSET", "HSETNX", "HINCRBY", "HDEL", "SET", "PX", "ZADD", "ZREM", "ZCARD", "XADD"}
    commands |= {"MAXLEN", "~", "*", "event", "data", "LLEN", "APPEND", "RPUSH", "PTTL", "PEXPIRE"}
    commands |= {"EXISTS", "EXPIRE", "DEL", "LPUSH", "LREM", "HMGET", "SADD", "LPOS", "", "{}", "0", "1"}
    commands |= {"LMOVE", "LEFT", "RIGHT", "LRANGE", "GET"}
    for script in scripts.SCRIPTS:
        literals = set(re.findall(r"'([^']*)'", script.source))
        assert literals - words - commands == set(), script.name


def test_an_ending_is_written_as_the_event_clients_read(redis_server: RedisServer) -> None:
    """The final event of a finished job carries its usage and timings; a failed one its error."""
    import json

    from shared.schemas import DoneEvent, GenerationRequest, JobError
    from worker.engine import EngineJob, ended

    r = redis_server.client(decode_responses=True)
    request = GenerationRequest(
        messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0.0, top_p=1.0
    )
    job = EngineJob("js8", request, 1.0, 2.0, 1e12, model="m")
    job.prompt_tokens, job.completion_tokens, job.first_token_at = 3, 2, 2.5
    _new_job(r, "js8")
    assert _start(r, "js8", "run-d") == "running"
    assert _finish(r, "js8", final_record(ended(job, "length"), 3.0), "run-d") == "ok"
    ((_, last),) = decoded_entries(r.xrevrange(keys.events("js8"), count=1))
    done = DoneEvent.model_validate(json.loads(last["data"]))
    assert (last["event"], done.finish_reason, done.usage.completion_tokens) == ("done", "length", 2)
    assert done.timings.tokens_per_second == 2.0  # the token after the first, in the 0.5 s after it

    _new_job(r, "js10")
    failed = final_record(ended(job, "error", "generation_error", "boom"), 3.0)
    assert _finish(r, "js10", failed, "") == "ok"
    ((_, last),) = decoded_entries(r.xrevrange(keys.events("js10"), count=1))
    assert last["event"] == "error"
    assert JobError.model_validate(json.loads(last["data"])) == JobError(
        type="generation_error", message="boom"
    )
    assert r.hget(keys.job("js10"), JobField.ERROR_TYPE) == "generation_error"


def test_a_redis_that_lost_the_scripts_gets_them_again_and_the_write_is_retried() -> None:
    """Redis restarted empty, or a replica that never saw the scripts took over: a pipeline of
    EVALSHAs finds them missing. Nothing of it was applied by a script; the scripts are loaded
    again and the caller's retry (a connection error) writes it all."""
    server = RedisServer()  # its own: SCRIPT FLUSH must not reach other tests' Redis
    try:
        r = server.client(decode_responses=True)
        job_scripts = JobScripts(r)
        _new_job(r, "js-noscript")
        r.script_flush()

        def start() -> list[object]:
            pipe = r.pipeline(transaction=False)
            job_scripts.run(_start_call("js-noscript", "run-n"), client=pipe)
            return job_scripts.execute(pipe)

        # A connection error: every caller retries it, as it does a dropped link.
        with pytest.raises(redis.ConnectionError) as raised:
            start()
        assert isinstance(raised.value, scripts.ScriptsReloaded)
        assert r.hget(keys.job("js-noscript"), "status") == "queued"  # nothing applied
        assert [scripts.started(a)[0] for a in start()] == ["running"]
        r.script_flush()  # a direct call reloads by itself (redis-py's EVALSHA, then SCRIPT LOAD)
        assert _run(r, scripts.renew("js-noscript", run="run-n", lease_ms=5000)) == RenewAnswer.HELD
    finally:
        server.close()


def test_output_with_logprobs_and_no_text_is_an_event_and_a_long_backlog_is_stored_whole(
    redis_server: RedisServer,
) -> None:
    """A token that spells nothing (a special token) still brings its logprob to the client; and
    a backlog of token ids kept while Redis was away (more than Lua unpacks at once) is written
    whole, in order, once."""
    r = redis_server.client(decode_responses=True)
    _new_job(r, "js-lp")
    assert _start(r, "js-lp", "run-l") == "running"
    entry = TokenLogprob(token="", logprob=-0.5, bytes=[], top_logprobs=[])
    call = scripts.delta(
        "js-lp",
        run="run-l",
        maxlen=100,
        text="",
        prompt_tokens=3,
        completion_tokens=1,
        stored=0,
        token_ids=[7],
        logprobs=[entry],
    )
    assert int(_run(r, call)) == DeltaAnswer.WRITTEN  # type: ignore[call-overload]
    assert _events(r, "js-lp") == ["started", "delta"]
    assert r.get(keys.text("js-lp")) is None  # no text yet: nothing appended
    backlog = list(range(9000))
    assert _delta(r, "js-lp", "run-l", "many ", backlog) == DeltaAnswer.WRITTEN
    assert r.lrange(keys.tokens("js-lp"), 0, -1) == ["7", *map(str, backlog)]
    job_ms = r.pttl(keys.job("js-lp"))
    for key in (keys.tokens("js-lp"), keys.text("js-lp")):  # they live as long as the job's hash
        assert abs(r.pttl(key) - job_ms) < 1000
