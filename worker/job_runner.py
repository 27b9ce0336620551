"""Running one RQ job: check it, start it, hand it to the engine, wait for its end.

This runs in the RQ worker's thread (one per slot). The engine generates; the publisher
writes the output and the final state; this thread only waits, so that RQ's own record of
the job (started, then finished, failed or canceled) follows the job's real life.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis

from shared import keys
from shared.job_state import START_SCRIPT, encode
from shared.schemas import GenerationRequest
from shared.settings import Settings
from worker.cancel_watcher import CancelWatcher
from worker.engine import Engine, EngineJob, ended
from worker.step_publisher import StepPublisher

log = logging.getLogger("streamq.worker")

CANCELED = "canceled"
FINISHED = "finished"
STUCK_MARGIN = 30.0  # seconds past its deadline before a job the engine never ended is failed here


class JobFailed(Exception):
    """Raised after a job's failure is recorded in its state, so that RQ files it as failed too."""


def _decode(mapping: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in mapping.items()
    }


class JobRunner:
    def __init__(
        self,
        connection: redis.Redis,
        engine: Engine,
        publisher: StepPublisher,
        settings: Settings,
        cancel_watcher: CancelWatcher,
        worker_name: str,
    ) -> None:
        self._redis = connection
        self._engine = engine
        self._publisher = publisher
        self._settings = settings
        self._cancels = cancel_watcher
        self._worker_name = worker_name
        self._start = connection.register_script(START_SCRIPT)

    def run(self, job_id: str, slot_name: str) -> str:
        """Run the job to its end; returns its final status ("finished" or "canceled").

        Raises JobFailed when it failed, after its failure is recorded.
        """
        fields = _decode(self._redis.hgetall(keys.job(job_id)))
        if not fields:
            raise JobFailed(f"job {job_id} has no state in Redis (expired or deleted)")
        request = GenerationRequest.model_validate_json(fields["request"])
        created_at = float(fields["created_at"])
        started_at = time.time()
        job = EngineJob(
            job_id, request, created_at, started_at, time.monotonic() + self._settings.job_timeout
        )
        waited = started_at - created_at
        if waited > self._settings.queue_ttl:
            limit = self._settings.queue_ttl
            message = f"the job waited {waited:.0f} s in its queue, longer than the limit of {limit} s"
            return self._end_here(job, ended(job, "error", "expired", message))
        answer = self._start(
            keys=[keys.job(job_id), keys.events(job_id)],
            args=[self._worker_name, started_at, self._settings.stream_maxlen, encode({"worker": slot_name})],
        )
        answer = answer.decode() if isinstance(answer, bytes) else str(answer)
        if answer == "cancel":
            return self._end_here(job, ended(job, "canceled"))
        if answer != "running":
            log.info("job %s: not started, its state is %s", job_id, answer)
            return answer
        log.info("job %s: started on %s (waited %.3fs)", job_id, slot_name, waited)
        job.cancel = self._cancels.watch(job_id)
        try:
            self._engine.submit(job)
            self._wait(job)
        finally:
            self._cancels.unwatch(job_id)
        return self._outcome(job)

    def _wait(self, job: EngineJob) -> None:
        limit = self._settings.job_timeout + STUCK_MARGIN
        while not job.ended.wait(1.0):
            if not self._engine.alive() or time.time() - job.started_at > limit:
                job.cancel.set()
                self._end_here(job, ended(job, "error", "generation_error", "the engine stopped"))
                return

    def _end_here(self, job: EngineJob, output: Any) -> str:
        """Write a job's end from this thread (through the publisher, like every other write)."""
        self._publisher.put([output])
        if not job.ended.wait(STUCK_MARGIN):
            raise JobFailed(f"job {job.job_id}: its end could not be written")
        return self._outcome(job)

    def _outcome(self, job: EngineJob) -> str:
        if job.status == "failed":
            raise JobFailed(f"job {job.job_id} failed: {job.error}")
        log.info("job %s: %s, %d tokens", job.job_id, job.status, job.completion_tokens)
        return job.status
