"""Finds jobs whose worker died and hands them to another; clears dead workers from the lists.

Every worker process and every front runs one (so jobs are requeued with no worker alive); a
Redis lock lets one at a time do the rounds (every ``janitor_interval`` seconds). A running job
whose lease has lapsed (its worker stopped renewing it: killed, frozen, cut off) is requeued at
the front of its model's RQ queue with its attempt count, and the next worker continues it from
the tokens already generated (see ``JobRunner``); after ``max_attempts`` runs it fails with an
``error`` event saying why. Not for a lease period after Redis failed, though: a failover or an
outage outlasts the leases of live workers, which renew them once Redis is back. RQ's registries
follow: the dead run's entry leaves the started registry and the job is queued again, so ``rq
info`` shows no ghost. A worker process whose heartbeat stopped is removed from streamq's worker
list and its RQ worker from RQ's. A job a worker took off its queue but died before
starting (or whose start a failover lost) is put back too, and one RQ failed is ended
(``shared.stranded_jobs``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import redis
from redis.exceptions import LockError
from redis.lock import Lock
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.worker import Worker

from shared import keys
from shared.background import BackgroundThread
from shared.job_store import scripts
from shared.job_store.payloads import Failed
from shared.job_store.rq_ended_records import file_canceled, file_failed, file_requeued
from shared.job_store.scripts import Answer, JobScripts
from shared.job_store.vocabulary import JobField, JobStatus
from shared.log_format import job_fields
from shared.redis_text import names, text
from shared.settings import Settings
from shared.stranded_jobs import StrandedJobs

log = logging.getLogger("streamq.janitor")


class Janitor(BackgroundThread):
    thread_name = "streamq-janitor"

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        super().__init__()
        self._redis = connection
        self._settings = settings
        self._janitor_lock = Lock(
            connection, keys.JANITOR_LOCK, timeout=3 * settings.janitor_interval, thread_local=False
        )
        self._holding = False
        self._renewed_at = float("-inf")
        self._scripts = JobScripts(connection)
        self.stranded = StrandedJobs(connection, settings)
        self._redis_failed_at = float("-inf")  # monotonic time of this janitor's last Redis error

    def _run(self) -> None:
        while not self._stop.wait(self._settings.janitor_interval):
            try:
                if self._lock():
                    self.sweep(still_ours=self._still_ours)
            except redis.RedisError as exc:
                self._redis_failed_at = time.monotonic()
                log.warning("janitor: Redis error: %s", exc)
            except Exception:  # a record it cannot read: said, and the next round goes on
                log.exception("janitor: a round failed")

    def _leases_trusted(self) -> bool:
        """Whether a missing lease means a dead worker. Not for a while after Redis failed (a
        failover, an outage): leases expired meanwhile although their workers live, and each
        worker renews its own within a renewal period of Redis coming back."""
        s = self._settings
        quiet = s.lease_seconds + 2 * s.lease_renew_seconds
        return time.monotonic() - self._redis_failed_at >= quiet

    def _lock(self) -> bool:
        """Hold the janitor lock for three rounds from now: renewed while this janitor holds it,
        taken when no one does. Renewing is one step that checks the holder (redis-py's Lock), so
        a lock that lapsed and went to another janitor is never extended by this one."""
        asked_at = time.monotonic()  # the lock's three rounds start after this
        if self._holding:
            try:
                self._janitor_lock.reacquire()
                self._renewed_at = asked_at
                return True
            except LockError:  # it lapsed (a long round, a pause); maybe taken by another janitor
                self._holding = False
        self._holding = self._janitor_lock.acquire(blocking=False)
        self._renewed_at = asked_at
        return self._holding

    def _still_ours(self) -> bool:
        """Whether this janitor may go on with its round: the lock was taken or renewed less than
        two rounds ago (it lasts three), else renewed now, if it is still this janitor's."""
        recent = time.monotonic() - self._renewed_at < 2 * self._settings.janitor_interval
        return (self._holding and recent) or self._lock()

    def sweep(self, still_ours: Callable[[], bool] = lambda: True) -> None:
        """One round. ``still_ours``: asked before each requeue (the lock, renewed: a round that
        outlived it stops, as another janitor may be sweeping now)."""
        self.requeue_orphans(still_ours)
        if still_ours():
            self.stranded.sweep()
        if still_ours():
            self.forget_dead_workers()

    def requeue_orphans(self, still_ours: Callable[[], bool] = lambda: True) -> list[str]:
        """Requeue (or fail) running jobs whose lease lapsed; returns the ids it requeued."""
        if not self._leases_trusted():
            return []
        running = names(self._redis.zrange(keys.RUNNING, 0, -1))
        if not running:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for job_id in running:
            pipe.exists(keys.lease(job_id))
            pipe.hmget(keys.job(job_id), [JobField.STATUS, JobField.MODEL])
        answers = pipe.execute()
        orphans = [
            # (its id, its model where it is running: "" for one no longer running)
            (job_id, (text(model) or "") if text(status) == JobStatus.RUNNING else "")
            for job_id, alive, (status, model) in zip(running, answers[::2], answers[1::2], strict=True)
            if not alive
        ]
        requeued = []
        s = self._settings
        for job_id, model in orphans:
            if not still_ours():
                break
            failure = Failed(
                type="worker_lost",
                message=f"the job's worker was lost {s.max_attempts} times; it is not run again",
            )
            # RQ's record first, the queued job's (without a push); then the script, which queues
            # the job again and puts the one copy of its id on its queue's front in one step: no
            # worker can take the id before the job is queued (and failed, its attempts spent), and
            # one that takes it at once writes its start in RQ after this record, not before. A
            # janitor that dies in between leaves the job running with no lease: the next round
            # does it again. One no longer running (ended, or its hash gone) is only taken off the
            # running set, by the script: queued again in RQ, it came back at every round.
            rq_job = self._rq_job(job_id) if model else None
            if rq_job is not None:
                file_requeued(self._redis, rq_job)
            requeue = scripts.requeue(
                job_id,
                maxlen=s.stream_maxlen,
                ttl=s.result_ttl,
                attempts_allowed=s.max_attempts,
                failure=failure,
                queue_list=keys.rq_queue(model) if model else None,
            )
            answer = scripts.answer(self._scripts.run(requeue))
            if answer in (Answer.REQUEUED, JobStatus.FAILED, JobStatus.CANCELED):  # else it ended meanwhile
                log.warning(
                    "janitor: job %s lost its worker: %s",
                    job_id,
                    answer,
                    extra=job_fields(answer, job_id, model, reason="worker_lost"),
                )
            if answer == Answer.REQUEUED:
                requeued.append(job_id)
            elif answer in (JobStatus.FAILED, JobStatus.CANCELED) and rq_job is not None:
                # RQ's failed or canceled job, off its queue, kept as long as streamq's record.
                if answer == JobStatus.CANCELED:
                    file_canceled(self._redis, rq_job, s.result_ttl)
                else:
                    file_failed(self._redis, rq_job, s.result_ttl, failure.message)
            # "alive": its worker came back in between (its end writes RQ's record again).
        return requeued

    def _rq_job(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self._redis)
        except NoSuchJobError:  # its id goes back on its model's queue all the same
            log.error("janitor: job %s has no RQ record left", job_id)
            return None

    def forget_dead_workers(self) -> None:
        """Drop worker processes whose heartbeat stopped, and their records in RQ's list of workers."""
        cutoff = time.time() - self._settings.worker_ttl
        dead = names(self._redis.zrangebyscore(keys.WORKERS, "-inf", cutoff))
        if not dead:
            return
        for worker in Worker.all(connection=self._redis):
            if any(worker.name == n or worker.name.startswith(f"{n}.") for n in dead):
                worker.register_death()
        pipe = self._redis.pipeline(transaction=True)
        for name in dead:
            pipe.zrem(keys.WORKERS, name)
            pipe.delete(keys.worker(name))
        pipe.execute()
        log.warning("janitor: removed dead worker(s) %s", ", ".join(dead))
