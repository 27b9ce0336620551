"""What the RQ tests share: a worker's engine side scripted per job, and names no other test
session shares."""

from __future__ import annotations

import uuid
from typing import Any

from rq.job import Job

from shared import keys
from streamq.redis_server import RedisServer
from worker.job_runner import Outcome


class Scripted:
    """The engine side of a worker, scripted per job id: what each run of the job ends with."""

    def __init__(self, redis_server: RedisServer, model: str, script: dict[str, list[Any]]) -> None:
        self.served_name = model
        self.redis = redis_server.client()
        self.script = script
        self.calls: list[tuple[str, str]] = []
        self.enqueued_at: list[Any] = []  # RQ's record of when the job (last) entered its queue

    def run_job(self, job_id: str, slot_name: str, fields: dict[str, str] | None = None) -> Outcome:
        self.calls.append((job_id, slot_name))
        self.enqueued_at.append(Job.fetch(job_id, connection=self.redis).enqueued_at)
        then = self.script[job_id].pop(0)
        if isinstance(then, Exception):
            raise then
        if then is Outcome.REQUEUED:  # what the handback script does before the run returns
            self.redis.lpush(keys.rq_queue(self.served_name), job_id)
        return Outcome(then)


def unique(name: str) -> str:
    """Names no other test session shares (sessions that run at once may share a Redis)."""
    return f"{name}-{uuid.uuid4().hex[:8]}"
