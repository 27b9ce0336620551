"""A run's output writes and its end against a real Redis: a write sent twice applies once, and
an end or a write that finds Redis holding other token ids than the run stored (a failover lost
some, or a write whose reply was lost did apply) hands the job back to be continued from what
Redis holds, so the answer has neither a hole nor a repeat."""

from __future__ import annotations

import redis

from harness.redis_server import RedisServer
from shared import keys
from shared.job_store import scripts
from shared.job_store.scripts import Answer, DeltaAnswer
from shared.job_store.vocabulary import JobStatus
from tests.job_scripts import _delta, _done, _events, _finish, _new_job, _run, _start, _start_call
from tests.redis_replies import decoded_entries


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


def _two_writes_then_a_failover_that_kept_one(r: redis.Redis, job_id: str, run: str) -> str:
    """A job taken off its queue (returned) and started; its run writes "one " [1], then "two "
    [2]; then a failover: the new primary has the first write only (each write is one step: its
    text, ids and the hash's counts are lost together)."""
    queue = keys.rq_queue(f"gap-{job_id}")
    _new_job(r, job_id, model=f"gap-{job_id}")
    r.lrem(queue, 1, job_id)  # a worker took it
    assert _start(r, job_id, run) == "running"
    assert _delta(r, job_id, run, "one ", [1], stored=0) == DeltaAnswer.WRITTEN
    assert _delta(r, job_id, run, "two ", [2], stored=1) == DeltaAnswer.WRITTEN
    r.set(keys.text(job_id), "one ")
    r.rpop(keys.tokens(job_id))
    r.hset(keys.job(job_id), mapping={"completion_tokens": 1, "stored_tokens": 1})
    return queue


def test_a_run_whose_last_writes_a_failover_lost_hands_the_job_back_for_a_continuation(
    redis_server: RedisServer,
) -> None:
    """Replication is asynchronous: a new primary may lack a run's last writes. The run's next write
    finds fewer token ids than it stored; it writes nothing, and hands the job back to its queue's
    front in the same step (not a lost attempt), to be continued from what Redis kept, not finished
    with a hole."""
    r = redis_server.client(decode_responses=True)
    queue = _two_writes_then_a_failover_that_kept_one(r, "js8", "run-g")
    attempts = int(r.hget(keys.job("js8"), "attempts") or 0)
    assert _delta(r, "js8", "run-g", "three", [3], stored=2, queue=queue) == DeltaAnswer.GAP
    assert (r.get(keys.text("js8")), r.lrange(keys.tokens("js8"), 0, -1)) == ("one ", ["1"])
    state = r.hgetall(keys.job("js8"))
    assert (state["status"], "run" in state, int(state["attempts"])) == ("queued", False, attempts - 1)
    assert r.lrange(queue, 0, -1) == ["js8"] and r.zscore(keys.RUNNING, "js8") is None
    assert not r.exists(keys.lease("js8")) and _events(r, "js8")[-1] == "queued"
    assert _finish(r, "js8", _done(), run="run-g") == Answer.LOST  # its end would leave a hole: none
    assert r.hget(keys.job("js8"), "status") == "queued"
    # The next run resumes at the 1 token that survived: its start reads it.
    assert scripts.started(_run(r, _start_call("js8", "run-h"))) == ("running", [1])
    assert _delta(r, "js8", "run-h", "two", [2], stored=1) == DeltaAnswer.WRITTEN
    assert r.get(keys.text("js8")) == "one two"


def _finish_with(r: redis.Redis, job_id: str, run: str, last: scripts.LastOutput) -> str:
    call = scripts.finish(job_id, _done(), ttl=60, maxlen=100, run=run, last=last)
    return scripts.answer(_run(r, call))


def test_a_runs_last_output_is_written_with_its_end_once(redis_server: RedisServer) -> None:
    """The publisher sends a run's last text in the script that ends the job: the client reads a
    ``delta`` and then ``done``, the text is whole, and the end sent again changes nothing."""
    r = redis_server.client(decode_responses=True)
    job_keys = _new_job(r, "js11")
    assert _start(r, "js11", "run-z") == "running"
    assert _delta(r, "js11", "run-z", "Hel", [1, 2], stored=0) == DeltaAnswer.WRITTEN
    last = scripts.LastOutput(stored=2, text="lo", queue_list=keys.rq_queue("m"))
    assert _finish_with(r, "js11", "run-z", last) == Answer.OK
    assert _finish_with(r, "js11", "run-z", last) == JobStatus.FINISHED  # sent again: already ended
    assert r.get(keys.text("js11")) == "Hello"
    entries = decoded_entries(r.xrange(keys.events("js11")))
    assert [f["event"] for _, f in entries] == ["started", "delta", "delta", "done"]
    assert entries[2][1]["data"] == '{"text":"lo"}'
    assert not r.exists(keys.tokens("js11")) and all(0 < r.ttl(k) <= 60 for k in job_keys)
    # A job whose only output comes with its end: its text is created there, living as its end says.
    _new_job(r, "js12")
    assert _start(r, "js12", "run-y") == "running"
    assert _finish_with(r, "js12", "run-y", scripts.LastOutput(stored=0, text="Hi")) == Answer.OK
    assert r.get(keys.text("js12")) == "Hi" and 0 < r.ttl(keys.text("js12")) <= 60
    assert _events(r, "js12") == ["started", "delta", "done"]


def test_an_end_that_finds_the_runs_last_writes_lost_hands_the_job_back(redis_server: RedisServer) -> None:
    """The end checks, as every output write does, that Redis still has the ids the run stored: a
    failover that lost some would leave a hole in a finished answer, so the job goes back to its
    queue's front instead, to be continued from what Redis kept."""
    r = redis_server.client(decode_responses=True)
    queue = _two_writes_then_a_failover_that_kept_one(r, "js13", "run-g")
    last = scripts.LastOutput(stored=2, text="three", queue_list=queue)
    assert _finish_with(r, "js13", "run-g", last) == Answer.REQUEUED
    state = r.hgetall(keys.job("js13"))
    assert (state["status"], "run" in state, state.get("finish_reason")) == ("queued", False, None)
    assert r.get(keys.text("js13")) == "one " and r.lrange(keys.tokens("js13"), 0, -1) == ["1"]
    assert r.lrange(queue, 0, -1) == ["js13"] and _events(r, "js13")[-1] == "queued"
    assert scripts.started(_run(r, _start_call("js13", "run-h"))) == ("running", [1])


def test_an_end_after_a_write_whose_reply_was_lost_repeats_nothing(redis_server: RedisServer) -> None:
    """A write applied, but its reply was lost; the run's end then carries that output again with
    more (the publisher could not know). Redis holds more ids than the run knows it stored: the
    job is handed back, to be continued from what Redis holds, rather than its text repeated."""
    r = redis_server.client(decode_responses=True)
    queue = keys.rq_queue("lost-reply")
    _new_job(r, "js14", model="lost-reply")
    r.lrem(queue, 1, "js14")
    assert _start(r, "js14", "run-r") == "running"
    assert _delta(r, "js14", "run-r", "Hel", [1, 2], stored=0) == DeltaAnswer.WRITTEN  # the reply is lost
    last = scripts.LastOutput(stored=0, text="Hello", queue_list=queue)
    assert _finish_with(r, "js14", "run-r", last) == Answer.REQUEUED
    assert r.get(keys.text("js14")) == "Hel" and r.hget(keys.job("js14"), "status") == "queued"
    assert _events(r, "js14") == ["started", "delta", "queued"] and r.lrange(queue, 0, -1) == ["js14"]
