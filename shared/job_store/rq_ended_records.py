"""RQ's record of a job that streamq ended outside a worker's run (a cancel of a job no run
holds, a dead worker's job the janitor ends), or of a dead worker's job that goes back on its
queue: filed as RQ's own tools expect it, an ended one with the lifetime of streamq's record of
it (``STREAMQ_RESULT_TTL``)."""

from __future__ import annotations

import contextlib

import redis
from rq.exceptions import InvalidJobOperation
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, FailedJobRegistry, StartedJobRegistry
from rq.utils import now


def file_canceled(connection: redis.Redis, job: Job, ttl: int) -> None:
    """The job canceled in RQ: off its queue, in the canceled registry, both kept ``ttl`` s
    (RQ's own cancel keeps the record for ever and its registry entry not at all)."""
    with contextlib.suppress(InvalidJobOperation):  # canceled in RQ already
        job.cancel()
    job.cleanup(ttl=ttl, remove_from_queue=False)
    CanceledJobRegistry(job.origin, connection=connection).add(job, ttl=ttl, xx=True)


def file_failed(connection: redis.Redis, job: Job, ttl: int, reason: str) -> None:
    """The job failed in RQ: off its queue, in the failed registry, both kept ``ttl`` s."""
    queue = Queue(job.origin, connection=connection)
    queue.remove(job)
    job.set_status(RQStatus.FAILED)
    job.cleanup(ttl=ttl, remove_from_queue=False)
    FailedJobRegistry(queue=queue).add(job, ttl=ttl, exc_string=reason)


def file_requeued(connection: redis.Redis, job: Job, executions: bool = True) -> None:
    """The job queued again in RQ's record (with ``executions``, its dead run's out of the
    started registry), without pushing its id: the job store's script pushes the one copy (a
    push here as well had the job taken twice). The janitor writes this before its script, so a
    worker that takes the id at once files its own start last."""
    queue = Queue(job.origin, connection=connection)
    with connection.pipeline() as pipe:
        if executions:
            StartedJobRegistry(queue=queue).remove_executions(job, pipeline=pipe)
        job.enqueued_at = now()
        job.set_status(RQStatus.QUEUED, pipeline=pipe)
        job.save(pipeline=pipe)
        pipe.execute()
