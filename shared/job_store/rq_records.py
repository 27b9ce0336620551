"""RQ's record of a queued job, made by RQ itself, for the script that creates a job in one step.

``Queue.enqueue_call`` would cost a round trip of its own (several commands in a transaction,
and an INFO per new ``Queue``) and is synchronous. Here RQ builds the job once per queue
(``create_job``), and for each new job its public setters give it the job's id, arguments,
description and times before RQ serializes it (``to_dict``) with what its enqueue sets (origin,
enqueue time, status ``queued``), with no Redis call. The ``submit`` script writes those fields
and pushes the id onto the queue as RQ's enqueue does, so RQ's workers, registries and ``rq
info`` see a normal job. tests/test_rq_submit.py checks the record against one RQ enqueued.
"""

from __future__ import annotations

from typing import Any

from rq.job import JobStatus
from rq.queue import Queue
from rq.utils import now

# The function every streamq job names, by name: the front never imports the worker
# (worker/tasks.py defines it, for RQ workers that are not streamq's).
TASK = "worker.tasks.generate"


class QueuedRecords:
    """RQ's records of ``func(job_id)`` jobs queued on ``queue``. No RQ ttl: RQ would drop an
    expired job silently, leaving it "queued" for streamq (the worker that takes a job that waited
    too long fails it as expired instead, STREAMQ_QUEUE_TTL). Not shared between tasks: it
    reuses one RQ job object."""

    def __init__(self, queue: Queue, func: str, *, timeout: int, result_ttl: int) -> None:
        self._job = queue.create_job(
            func,
            args=("",),
            timeout=timeout,
            ttl=None,
            result_ttl=result_ttl,
            failure_ttl=result_ttl,
            status=JobStatus.QUEUED,
        )
        self._job.origin = queue.name

    def queued(self, job_id: str, description: str) -> dict[str, Any]:
        """The fields of RQ's hash for the job ``job_id``, queued now."""
        job = self._job
        job.id = job_id
        job.args = (job_id,)
        job.description = description
        job.created_at = job.enqueued_at = now()
        return job.to_dict()
