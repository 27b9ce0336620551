"""RQ's record of a queued job, made by RQ itself, for the script that creates a job in one step.

``Queue.enqueue_call`` would cost a round trip of its own (several commands in a transaction,
and an INFO per new ``Queue``) and is synchronous. Here RQ builds the job (``create_job``) and
serializes it (``to_dict``) with what its enqueue sets before saving (origin, enqueue time,
status ``queued``), with no Redis call; the ``submit`` script writes those fields and pushes the
id onto the queue as RQ's enqueue does. So RQ's workers, registries and ``rq info`` see a normal
job. tests/test_rq_adapter.py checks the record against one RQ enqueued itself.
"""

from __future__ import annotations

from typing import Any

from rq.job import JobStatus
from rq.queue import Queue
from rq.utils import now


def queued_rq_job(
    queue: Queue, job_id: str, func: str, *, timeout: int, result_ttl: int, description: str
) -> dict[str, Any]:
    """The fields of RQ's hash for ``func(job_id)`` queued on ``queue``. No RQ ttl: RQ would drop
    an expired job silently, leaving it "queued" for streamq (the worker that takes a job that
    waited too long fails it as expired instead, STREAMQ_QUEUE_TTL)."""
    job = queue.create_job(
        func,
        args=(job_id,),
        job_id=job_id,
        timeout=timeout,
        ttl=None,
        result_ttl=result_ttl,
        failure_ttl=result_ttl,
        description=description,
        status=JobStatus.QUEUED,
    )
    job.origin = queue.name
    job.enqueued_at = now()
    return job.to_dict()
