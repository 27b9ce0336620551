"""A job a front creates with the submit script is the job RQ would have enqueued, against the
installed RQ (the script writes RQ's record and queue entry with the job's own); a submit sent
twice makes one job; the script keeps the queue limit and the key quota."""

from __future__ import annotations

import time
import uuid
from typing import Any

from rq.job import Job, JobStatus
from rq.queue import Queue

from harness.redis_server import RedisServer
from shared import keys
from shared.job_store import scripts
from shared.job_store.payloads import Queued
from shared.job_store.rq_records import QueuedRecords
from shared.job_store.scripts import JobScripts
from tests.redis_replies import entries
from tests.rq_doubles import unique
from worker.tasks import TASK, generate


def _submit(
    r: Any, queue: Queue, job_id: str, records: QueuedRecords | None = None, **limits: Any
) -> list[Any]:
    """Create a job the way a front does: the submit script, with RQ's record from RQ itself."""
    records = records or QueuedRecords(queue, TASK, timeout=300, result_ttl=60)
    rq_job = records.queued(job_id, f"job {job_id}")
    fields = {"id": job_id, "status": "queued", "model": "m", "created_at": repr(time.time())}
    call = scripts.submit(
        job_id,
        fields=fields,
        rq_job=rq_job,
        queue_list=queue.key,
        max_queued=limits.get("max_queued", 0),
        life=600,
        maxlen=100,
        queued_event=Queued(model="m"),
        quota=limits.get("quota"),
        now=time.time(),
    )
    return list(JobScripts(r).run(call))


def test_a_job_the_front_creates_is_the_job_rq_would_have_enqueued(redis_server: RedisServer) -> None:
    """One script writes RQ's record and queue entry with the job's own: RQ must see the same job
    as its own enqueue_call makes (fields, status, queue, registry of queues), and fetch it."""
    r = redis_server.client()
    queue = Queue(unique("rq-format"), connection=r)
    theirs, ours = uuid.uuid4().hex, uuid.uuid4().hex
    queue.enqueue_call(
        TASK,
        args=(theirs,),
        job_id=theirs,
        timeout=300,
        ttl=None,
        result_ttl=60,
        failure_ttl=60,
        description=f"job {theirs}",
    )
    records = QueuedRecords(queue, TASK, timeout=300, result_ttl=60)  # one per queue, reused
    records.queued(uuid.uuid4().hex, "another job, not submitted")
    assert _submit(r, queue, ours, records) == [b"queued", 1]
    rq_fields, our_fields = r.hgetall(Job.key_for(theirs)), r.hgetall(Job.key_for(ours))
    assert set(our_fields) == set(rq_fields)
    moments = {b"created_at", b"enqueued_at", b"data", b"description"}  # the time, and the job's id
    assert {k: v for k, v in our_fields.items() if k not in moments} == {
        k: v for k, v in rq_fields.items() if k not in moments
    }
    assert r.ttl(Job.key_for(ours)) == r.ttl(Job.key_for(theirs)) == -1  # RQ sets no TTL at enqueue
    job = Job.fetch(ours, connection=r)
    assert (job.func_name, job.args, job.origin, job.get_status()) == (
        TASK,
        (ours,),
        queue.name,
        JobStatus.QUEUED,
    )
    assert job.enqueued_at is not None and job.timeout == 300
    assert job.func is generate  # the name the front writes is the worker's function
    assert queue.job_ids == [theirs, ours] and queue.count == 2
    assert queue.key.encode() in r.smembers(keys.RQ_QUEUES)


def test_a_submit_sent_twice_creates_one_job(redis_server: RedisServer) -> None:
    """The front's connection dropped after Redis ran the script, and redis-py sent it again (or
    a client sent its request again with its Idempotency-Key): the front is told the job exists,
    with what made it (its fingerprint, none here), and the job is queued once (even with the
    queue then full)."""
    r = redis_server.client()
    queue = Queue(unique("rq-twice"), connection=r)
    records = QueuedRecords(queue, TASK, timeout=300, result_ttl=60)
    job_id = uuid.uuid4().hex
    assert _submit(r, queue, job_id, records, max_queued=1) == [b"queued", 0]
    assert _submit(r, queue, job_id, records, max_queued=1) == [b"exists", b""]
    assert queue.job_ids == [job_id]
    assert [fields[b"event"] for _, fields in entries(r.xrange(keys.events(job_id)))] == [b"queued"]
    # Its records expire even if it never ends (its job hash and its stream of events).
    assert 0 < r.ttl(keys.job(job_id)) <= 600 and 0 < r.ttl(keys.events(job_id)) <= 600


def test_the_submit_script_keeps_the_queue_limit_and_the_key_quota(redis_server: RedisServer) -> None:
    r = redis_server.client()
    queue = Queue(unique("rq-limits"), connection=r)
    assert [_submit(r, queue, uuid.uuid4().hex, max_queued=2)[0] for _ in range(3)] == [b"queued"] * 2 + [
        b"full"
    ]
    assert queue.count == 2
    owner = unique("key")
    quota = scripts.Quota(owner, 1, 60)
    other = Queue(unique("rq-quota"), connection=r)
    first = uuid.uuid4().hex
    assert _submit(r, other, first, quota=quota) == [b"queued", 0]
    assert _submit(r, other, uuid.uuid4().hex, quota=quota) == [b"quota", 0]
    assert other.job_ids == [first]  # refused: nothing of it written
    assert r.zrange(keys.key_active(owner), 0, -1) == [first.encode()]
    assert 0 < r.ttl(keys.key_active(owner)) <= 60  # the key's set of active jobs expires too
