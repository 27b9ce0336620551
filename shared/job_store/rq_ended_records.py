"""RQ's record of a job that streamq ended outside a worker's run (a cancel of a job no run
holds, a dead worker's job the janitor ends): filed as RQ's own tools expect it, with the
lifetime of streamq's record of it (``STREAMQ_RESULT_TTL``)."""

from __future__ import annotations

import contextlib

import redis
from rq.exceptions import InvalidJobOperation
from rq.job import Job
from rq.job import JobStatus as RQStatus
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, FailedJobRegistry


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
