"""The Lua scripts that move a job's state, against a real Redis: a job ends exactly once, and
only the run that holds a job writes to it."""

from __future__ import annotations

import redis

from shared import keys
from shared.job_state import (
    CANCEL_SCRIPT,
    DELTA_SCRIPT,
    FINISH_SCRIPT,
    RENEW_SCRIPT,
    REQUEUE_SCRIPT,
    START_SCRIPT,
    cancel_args,
    cancel_keys,
    ending_keys,
    finish_args,
    requeue_args,
)
from streamq.redis_server import RedisServer


def _new_job(r: redis.Redis, job_id: str, model: str = "m") -> list[str]:
    r.hset(keys.job(job_id), mapping={"status": "queued", "model": model})
    r.expire(keys.job(job_id), 300)
    r.rpush(keys.rq_queue(model), job_id)
    return [keys.job(job_id), keys.events(job_id), keys.text(job_id)]


def _events(r: redis.Redis, job_id: str) -> list[str]:
    return [fields["event"] for _, fields in r.xrange(keys.events(job_id))]


def _start(r: redis.Redis, job_id: str, run: str, lease_ms: int = 5000) -> str:
    start = r.register_script(START_SCRIPT)
    start_keys = [keys.job(job_id), keys.events(job_id), keys.lease(job_id), keys.RUNNING]
    return str(start(keys=start_keys, args=["w1", 1.0, 100, "{}", run, lease_ms, job_id]))


def _delta(
    r: redis.Redis, job_id: str, run: str, text: str, ids: list[int], stored: int | None = None
) -> int:
    delta = r.register_script(DELTA_SCRIPT)
    job_keys = [keys.job(job_id), keys.events(job_id), keys.text(job_id), keys.tokens(job_id)]
    before = r.llen(keys.tokens(job_id)) if stored is None else stored
    return int(delta(keys=job_keys, args=[run, 100, '{"text":"x"}', text, 3, len(ids), before, *ids]))


def test_a_job_ends_once_and_a_late_finish_changes_nothing(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    job_keys = _new_job(r, "js1")
    finish = r.register_script(FINISH_SCRIPT)
    assert _start(r, "js1", "run-a") == "running"
    assert r.zscore(keys.RUNNING, "js1") is not None and r.get(keys.lease("js1")) == "run-a"
    done = finish_args("finished", "done", {}, 60, 100, {"finish_reason": "stop"}, "run-a", "js1")
    assert finish(keys=ending_keys("js1"), args=done) == "ok"
    late = finish_args("canceled", "canceled", {}, 60, 100, {"finish_reason": "canceled"}, "run-a", "js1")
    assert finish(keys=ending_keys("js1"), args=late) == "finished"
    assert r.hget(job_keys[0], "status") == "finished" and r.hget(job_keys[0], "finish_reason") == "stop"
    assert _events(r, "js1") == ["started", "done"]
    assert all(0 < r.ttl(k) <= 60 for k in job_keys[:2])
    assert r.zscore(keys.RUNNING, "js1") is None and not r.exists(keys.lease("js1"))


def test_cancel_ends_a_job_no_run_holds_and_flags_a_running_one(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    cancel = r.register_script(CANCEL_SCRIPT)

    queued = _new_job(r, "js2")
    assert cancel(keys=cancel_keys("js2", "m"), args=cancel_args("js2", 60, 100, {})) == "ok"
    assert r.lpos(keys.rq_queue("m"), "js2") is None
    assert r.hget(queued[0], "status") == "canceled" and _events(r, "js2") == ["canceled"]
    # A worker that had already popped it finds it canceled and does not start it.
    assert _start(r, "js2", "run-b") == "canceled"

    # Taken by a worker (RQ's BLMOVE into the intermediate list) that has not started it, or that
    # died before it could: no run holds it, so the cancel ends it here and now.
    taken = _new_job(r, "js9")
    intermediate = keys.intermediate(keys.rq_queue("m"))
    r.lmove(keys.rq_queue("m"), intermediate)
    assert cancel(keys=cancel_keys("js9", "m"), args=cancel_args("js9", 60, 100, {})) == "ok"
    assert r.hget(taken[0], "status") == "canceled" and _events(r, "js9") == ["canceled"]
    assert r.lpos(intermediate, "js9") is None
    assert _start(r, "js9", "run-e") == "canceled"  # the worker, should it wake, leaves it

    running = _new_job(r, "js3")
    r.lrem(keys.rq_queue("m"), 1, "js3")  # a worker took it and started it
    assert _start(r, "js3", "run-c") == "running"
    assert cancel(keys=cancel_keys("js3", "m"), args=cancel_args("js3", 60, 100, {})) == "running"
    assert r.hget(running[0], "cancel") == "1" and r.hget(running[0], "status") == "running"

    assert cancel(keys=cancel_keys("js2", "m"), args=cancel_args("js2", 60, 100, {})) == "canceled"
    assert cancel(keys=cancel_keys("none", "m"), args=cancel_args("none", 60, 100, {})) == "missing"


def test_only_the_run_holding_a_job_writes_to_it(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    _new_job(r, "js4")
    assert _start(r, "js4", "run-old") == "running"
    assert _delta(r, "js4", "run-old", "Hello", [11, 12]) == 0
    assert r.lrange(keys.tokens("js4"), 0, -1) == ["11", "12"] and r.ttl(keys.tokens("js4")) > 0
    # Its lease lapses (the worker froze); the janitor hands the job back; another run starts it.
    r.delete(keys.lease("js4"))
    requeue = r.register_script(REQUEUE_SCRIPT)
    lost = {"type": "worker_lost", "message": "gone"}
    assert requeue(keys=ending_keys("js4"), args=requeue_args("js4", 100, 60, 3, lost)) == "requeued"
    assert r.hget(keys.job("js4"), "status") == "queued"
    assert _start(r, "js4", "run-new") == "running" and r.hget(keys.job("js4"), "attempts") == "2"
    # The old run wakes up: it can neither write nor renew nor finish.
    assert _delta(r, "js4", "run-old", " stale", [99]) == -1
    renew = r.register_script(RENEW_SCRIPT)
    assert renew(keys=[keys.job("js4"), keys.lease("js4")], args=["run-old", 5000]) == 0
    finish = r.register_script(FINISH_SCRIPT)
    stale = finish_args("finished", "done", {}, 60, 100, {"finish_reason": "stop"}, "run-old", "js4")
    assert finish(keys=ending_keys("js4"), args=stale) == "lost"
    assert _delta(r, "js4", "run-new", " world", [13]) == 0
    assert r.get(keys.text("js4")) == "Hello world"
    assert r.lrange(keys.tokens("js4"), 0, -1) == ["11", "12", "13"]
    assert _events(r, "js4") == ["started", "delta", "queued", "started", "delta"]


def test_a_job_whose_worker_keeps_dying_fails_after_its_attempts(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    _new_job(r, "js5")
    requeue = r.register_script(REQUEUE_SCRIPT)
    lost = {"type": "worker_lost", "message": "its worker was lost 2 times"}
    for attempt in (1, 2):
        assert _start(r, "js5", f"run-{attempt}") == "running"
        args = requeue_args("js5", 100, 60, 2, lost)
        assert requeue(keys=ending_keys("js5"), args=args) == "alive"  # the lease is live: leave it
        r.delete(keys.lease("js5"))
        assert requeue(keys=ending_keys("js5"), args=args) == ("requeued" if attempt == 1 else "failed")
    state = r.hgetall(keys.job("js5"))
    assert (state["status"], state["error_type"]) == ("failed", "worker_lost")
    assert _events(r, "js5")[-1] == "error" and r.zscore(keys.RUNNING, "js5") is None


def test_an_output_write_sent_twice_is_applied_once(redis_server: RedisServer) -> None:
    # A round trip whose reply was lost is sent again (redis-py retries on a dropped connection).
    r = redis_server.client(decode_responses=True)
    _new_job(r, "js6")
    assert _start(r, "js6", "run-a") == "running"
    assert _delta(r, "js6", "run-a", "Hel", [1, 2], stored=0) == 0
    assert _delta(r, "js6", "run-a", "Hel", [1, 2], stored=0) == 0  # the same write again
    assert _delta(r, "js6", "run-a", "lo", [3], stored=2) == 0
    assert r.get(keys.text("js6")) == "Hello"
    assert r.lrange(keys.tokens("js6"), 0, -1) == ["1", "2", "3"]
    assert _events(r, "js6") == ["started", "delta", "delta"]


def test_a_handback_puts_the_job_back_on_its_queue_in_the_same_step(redis_server: RedisServer) -> None:
    """A stopping worker's handback leaves no window where the job is queued in streamq but on no
    RQ list: the script itself pushes it to the queue's front (RQ's enqueue then writes its record)."""
    r = redis_server.client(decode_responses=True)
    _new_job(r, "js7", model="hb")
    r.lrem(keys.rq_queue("hb"), 1, "js7")  # a worker took it
    assert _start(r, "js7", "run-h") == "running"
    r.rpush(keys.rq_queue("hb"), "other")
    requeue = r.register_script(REQUEUE_SCRIPT)
    args = requeue_args("js7", 100, 60, 3, {"type": "", "message": ""}, "run-h")
    assert requeue(keys=[*ending_keys("js7"), keys.rq_queue("hb")], args=args) == "requeued"
    assert r.hget(keys.job("js7"), "status") == "queued"
    assert r.lrange(keys.rq_queue("hb"), 0, -1) == ["js7", "other"]
    # Its record gone (expired, or Redis came back empty): the run is told so, not "taken".
    r.delete(keys.job("js7"))
    renew = r.register_script(RENEW_SCRIPT)
    assert renew(keys=[keys.job("js7"), keys.lease("js7")], args=["run-h", 5000]) == -1
