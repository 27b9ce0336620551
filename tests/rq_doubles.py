"""What the RQ tests share: a worker's engine side scripted per job, names no other test session
shares, jobs queued the RQ way, and a dispatcher run as ``streamq worker`` runs it."""

from __future__ import annotations

import threading
import uuid
from typing import Any

from rq.job import Job
from rq.queue import Queue

from harness.redis_server import RedisServer
from shared import keys
from worker.dispatcher import Dispatcher
from worker.job_runner import Outcome
from worker.tasks import TASK


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


def enqueue(redis_server: RedisServer, model: str, job_ids: list[str]) -> Queue:
    queue = Queue(keys.queue_name(model), connection=redis_server.client())
    for job_id in job_ids:
        queue.enqueue_call(TASK, args=(job_id,), job_id=job_id, result_ttl=600, failure_ttl=600)
    return queue


def slot_threads() -> set[int | None]:
    """The job threads of the dispatchers in this process (their pools name them so)."""
    return {t.ident for t in threading.enumerate() if t.name.startswith("streamq-job")}


def dispatch_in_a_thread(dispatcher: Dispatcher) -> tuple[threading.Thread, list[BaseException]]:
    """As ``streamq worker`` runs its dispatcher: not in the main thread. Returns the thread and
    what ``run`` raised, if anything."""
    failed: list[BaseException] = []

    def work() -> None:
        try:
            dispatcher.run()
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=work, name="rq-contract-dispatcher", daemon=True)
    thread.start()
    return thread, failed
