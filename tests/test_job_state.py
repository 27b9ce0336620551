"""The Lua scripts that move a job's state, against a real Redis: a job ends exactly once."""

from __future__ import annotations

import redis

from shared import keys
from shared.job_state import CANCEL_SCRIPT, FINISH_SCRIPT, START_SCRIPT, cancel_args, finish_args
from tests.processes import RedisServer


def _new_job(r: redis.Redis, job_id: str, model: str = "m") -> list[str]:
    r.hset(keys.job(job_id), mapping={"status": "queued", "model": model})
    r.rpush(keys.rq_queue(model), job_id)
    return [keys.job(job_id), keys.events(job_id), keys.text(job_id)]


def _events(r: redis.Redis, job_id: str) -> list[str]:
    return [fields["event"] for _, fields in r.xrange(keys.events(job_id))]


def test_a_job_ends_once_and_a_late_finish_changes_nothing(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    job_keys = _new_job(r, "js1")
    start, finish = r.register_script(START_SCRIPT), r.register_script(FINISH_SCRIPT)
    assert start(keys=job_keys[:2], args=["w1", 1.0, 100, "{}"]) == "running"
    done = finish_args("finished", "done", {}, 60, 100, {"finish_reason": "stop"})
    assert finish(keys=job_keys, args=done) == "ok"
    late = finish_args("canceled", "canceled", {}, 60, 100, {"finish_reason": "canceled"})
    assert finish(keys=job_keys, args=late) == "finished"
    assert r.hget(job_keys[0], "status") == "finished" and r.hget(job_keys[0], "finish_reason") == "stop"
    assert _events(r, "js1") == ["started", "done"]
    assert all(0 < r.ttl(k) <= 60 for k in job_keys[:2])


def test_cancel_takes_a_queued_job_off_its_queue_and_flags_a_running_one(redis_server: RedisServer) -> None:
    r = redis_server.client(decode_responses=True)
    cancel, start = r.register_script(CANCEL_SCRIPT), r.register_script(START_SCRIPT)

    queued = _new_job(r, "js2")
    assert cancel(keys=[*queued, keys.rq_queue("m")], args=cancel_args("js2", 60, 100, {})) == "ok"
    assert r.lpos(keys.rq_queue("m"), "js2") is None
    assert r.hget(queued[0], "status") == "canceled" and _events(r, "js2") == ["canceled"]
    # A worker that had already popped it finds it canceled and does not start it.
    assert start(keys=queued[:2], args=["w1", 1.0, 100, "{}"]) == "canceled"

    running = _new_job(r, "js3")
    r.lrem(keys.rq_queue("m"), 1, "js3")  # a worker took it
    assert cancel(keys=[*running, keys.rq_queue("m")], args=cancel_args("js3", 60, 100, {})) == "running"
    assert r.hget(running[0], "cancel") == "1" and r.hget(running[0], "status") == "queued"
    assert start(keys=running[:2], args=["w1", 1.0, 100, "{}"]) == "cancel"  # it will not run

    assert cancel(keys=[*queued, keys.rq_queue("m")], args=cancel_args("js2", 60, 100, {})) == "canceled"
    assert (
        cancel(keys=["streamq:job:{none}", "e", "t", "q"], args=cancel_args("none", 60, 100, {})) == "missing"
    )
