"""Running one RQ job: check it, start it, hand it to the engine, wait for its end.

This runs in a job thread (one per running job, from the dispatcher's pool). The engine
generates; the publisher writes the output and the final state; this thread only waits, so
that RQ's record of the job (started, then finished, failed or canceled) follows its real life.
"""

from __future__ import annotations

import logging
import time
import uuid
from enum import StrEnum
from typing import Any

import redis

from shared import keys
from shared.job_store import scripts
from shared.job_store.scripts import Answer, JobScripts, ScriptsReloaded
from shared.job_store.vocabulary import JobField, JobStatus
from shared.log_format import job_fields
from shared.redis_text import hash_fields
from shared.schemas import GenerationRequest
from shared.settings import Settings
from worker.cancel_watcher import CancelWatcher
from worker.engine import HANDBACK, Engine, EngineJob, ended
from worker.leases import LeaseKeeper
from worker.metrics import WorkerMetrics
from worker.step_publisher import StepPublisher

log = logging.getLogger("streamq.worker")

STUCK_MARGIN = 30.0  # seconds past its deadline before a job the engine never ended is failed here


class JobFailed(Exception):
    """Raised after a job's failure is recorded in its state, so that RQ files it as failed too;
    ``error_type``: its failure's type where known (``invalid_request_error``: the request's fault)."""

    def __init__(self, message: str, error_type: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type


class Outcome(StrEnum):
    """How a job's run ended on this worker, which decides how RQ files it (``worker.rq_worker``);
    a failure is not an outcome but ``JobFailed``. The value is the final status as this worker
    saw it (RQ keeps it as the job's result; the metrics count jobs by it)."""

    FINISHED = "finished"  # RQ: finished
    CANCELED = "canceled"  # RQ: canceled registry
    REQUEUED = "requeued"  # handed back to its queue by a stopping worker, for another to continue
    LOST = "lost"  # another worker holds the job now (this one was taken for dead): RQ's record is its
    MISSING = "missing"  # its state was gone when it came to start or end: RQ: finished

    @classmethod
    def of(cls, status: str) -> Outcome:
        """The outcome for a status a script answered; one this worker does not know is filed
        finished in RQ, as any status but canceled, requeued or lost always was."""
        try:
            return cls(status)
        except ValueError:
            log.warning("a job ended with an unknown status %r: filed as finished in RQ", status)
            return cls.FINISHED


class JobRunner:
    def __init__(
        self,
        connection: redis.Redis,
        engine: Engine,
        publisher: StepPublisher,
        settings: Settings,
        cancel_watcher: CancelWatcher,
        leases: LeaseKeeper,
        worker_name: str,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self._metrics = metrics or WorkerMetrics("")
        self._redis = connection
        self._engine = engine
        self._publisher = publisher
        self._settings = settings
        self._cancels = cancel_watcher
        self._leases = leases
        self._worker_name = worker_name
        self._scripts = JobScripts(connection)

    def run(self, job_id: str, slot_name: str, fields: dict[str, str] | None = None) -> Outcome:
        """Run the job to its end; returns how it ended here. ``fields``: the job's hash, when the
        caller read it already (the dispatcher reads it with the run's RQ record).

        Raises JobFailed when it failed, after its failure is recorded.
        """
        if fields is None:
            fields = hash_fields(self._redis.hgetall(keys.job(job_id)))
        if not fields:
            raise JobFailed(f"job {job_id} has no state in Redis (expired or deleted)")
        request = GenerationRequest.model_validate_json(fields[JobField.REQUEST])
        created_at = float(fields[JobField.CREATED_AT])
        started_at = time.time()
        job = EngineJob(
            job_id,
            request,
            created_at,
            started_at,
            time.monotonic() + (request.timeout or self._settings.job_timeout),
            model=fields.get(JobField.MODEL, ""),
        )  # no run yet: an end written before the job starts is not fenced
        waited = started_at - created_at
        limit = request.queue_ttl or self._settings.queue_ttl
        queue_list = keys.rq_queue(job.model)
        if self._engine.stopping():  # taken just as this worker stops: back to the queue, untouched
            # (unless a janitor that found it taken put it back already; a plain RQ worker took
            # it off that list itself, and it is on no list then), in one step
            self._scripts.run(scripts.put_back(queue_list, [job_id], unlisted=True))
            return Outcome.REQUEUED
        attempts = int(fields.get(JobField.ATTEMPTS) or 0)
        # A continued job was not waiting all along. Not "no attempts": a handback (a draining
        # worker, a failover's gap) gives its attempt back, and such a job, older than its
        # queue_ttl, was failed "expired" mid-answer. The first start's time is kept for good.
        first_run = not fields.get(JobField.STARTED_AT)
        if not first_run:
            job.first_started_at = float(fields[JobField.STARTED_AT])
            # Its timeout counts from its first start, the runs before this one and their gaps
            # included: restarted with each run, a job handed back or continued again and again
            # ran on past it, and past its keys' lifetime (set at submit: queue TTL + timeout +
            # result TTL), which then expired under it mid-answer. Spent already: it ends at
            # once, "timeout", with the text it has.
            job.deadline -= max(0.0, started_at - job.first_started_at)
        if first_run and waited > limit:
            self._metrics.queue_wait.observe(waited)  # the longest waits too, or the histogram lies low
            message = f"the job waited {waited:.0f} s in its queue, longer than the limit of {limit} s"
            try:
                return self._end_here(job, ended(job, "error", "expired", message))
            finally:  # never started: done with it, once its end is written (a kill before that
                self._redis.lrem(keys.intermediate(queue_list), 1, job_id)  # leaves it listed)
        run = f"{slot_name}:{uuid.uuid4().hex[:12]}"
        answer, job.resume_ids = self._start(job, slot_name, run, attempts + 1, queue_list)
        if answer == Answer.CANCEL:
            return self._end_here(job, ended(job, "canceled"))
        if answer == Answer.TAKEN:  # another worker holds it (a duplicate delivery): leave it to that one
            return Outcome.LOST
        if answer == JobStatus.FAILED:
            raise JobFailed(f"job {job_id} had already failed")
        if answer != Answer.RUNNING:
            log.info("job %s: not started, its state is %s", job_id, answer)
            return Outcome.of(answer)
        job.run = run
        if first_run:
            self._metrics.queue_wait.observe(waited)
        self._log_started(job, slot_name, waited, attempts + 1)
        job.cancel = cancel = self._cancels.watch(job_id)
        self._leases.hold(job)
        try:
            self._engine.model.prepare(job)  # its prompt and grammar, here, not in the engine's thread
            if not self._engine.submit(job):  # the engine stopped while this job was starting
                return self._end_here(job, ended(job, HANDBACK))
            self._wait(job)
        finally:
            self._leases.release(job)
            self._cancels.unwatch(job_id, cancel)
        return self._outcome(job)

    def _start(
        self, job: EngineJob, slot_name: str, run: str, attempt: int, queue_list: str
    ) -> tuple[str, list[int]]:
        """The start script's answer for the job, and the token ids an earlier run generated."""
        s = self._settings
        start = scripts.start(
            job.job_id,
            worker=self._worker_name,
            slot=slot_name,
            run=run,
            now=job.started_at,
            attempt=attempt,
            lease_ms=int(s.lease_seconds * 1000),
            maxlen=s.stream_maxlen,
            taken_into=keys.intermediate(queue_list) if job.model else None,
        )
        for first_try in (True, False):
            pipe = self._redis.pipeline(transaction=False)
            self._scripts.run(start, client=pipe)  # with what an earlier run generated, if any
            try:
                (reply,) = self._scripts.execute(pipe)
                break
            except ScriptsReloaded:  # nothing was started: start it now
                if not first_try:
                    raise
        return scripts.started(reply)

    def _log_started(self, job: EngineJob, slot_name: str, waited: float, attempt: int) -> None:
        log.info(
            "job %s: started on %s (waited %.3fs%s)",
            job.job_id,
            slot_name,
            waited,
            f", continuing after {len(job.resume_ids)} tokens" if job.resume_ids else "",
            extra=job_fields(
                "started",
                job.job_id,
                job.model,
                worker=self._worker_name,
                slot=slot_name,
                queue_seconds=round(waited, 6),
                attempt=attempt,
                resumed_tokens=len(job.resume_ids),
            ),
        )

    def _wait(self, job: EngineJob) -> None:
        stuck_at = job.deadline + STUCK_MARGIN  # monotonic: a step of the wall clock stops no job
        while not job.ended.wait(1.0):
            stopped = not self._engine.alive() and not job.ended.wait(STUCK_MARGIN)
            if stopped or time.monotonic() > stuck_at:
                job.cancel.set()
                self._end_here(job, ended(job, "error", "generation_error", "the engine stopped"))
                return

    def _end_here(self, job: EngineJob, output: Any) -> Outcome:
        """Write a job's end from this thread (through the publisher, like every other write)."""
        self._publisher.put([output])
        if not job.ended.wait(STUCK_MARGIN):
            raise JobFailed(f"job {job.job_id}: its end could not be written")
        return self._outcome(job)

    def _outcome(self, job: EngineJob) -> Outcome:
        ended_at = time.time()
        tokens = job.completion_tokens - len(job.resume_ids)  # generated by this run
        first = job.first_token_at
        if first is not None and tokens > 1 and ended_at > first:
            self._metrics.inter_token_latency.observe((ended_at - first) / (tokens - 1))
        timings = {
            "queue_seconds": round(
                (job.first_started_at or job.started_at) - job.created_at, 6
            ),  # as the record
            "first_token_seconds": round(first - job.started_at, 6) if first else None,
            "run_seconds": round(ended_at - job.started_at, 6),
            "completion_tokens": job.completion_tokens,
        }
        fields = job_fields(job.status, job.job_id, job.model, worker=self._worker_name, **timings)
        if job.status == JobStatus.FAILED:
            # The request's fault (a schema no grammar takes) is no trouble of the service's.
            level = logging.INFO if job.error_type == "invalid_request_error" else logging.WARNING
            extra = {**fields, "error": job.error, "error_type": job.error_type}
            log.log(level, "job %s: failed (%s): %s", job.job_id, job.error_type, job.error, extra=extra)
            raise JobFailed(f"job {job.job_id} failed: {job.error}", job.error_type)
        log.info("job %s: %s, %d tokens", job.job_id, job.status, job.completion_tokens, extra=fields)
        return Outcome.of(job.status)
