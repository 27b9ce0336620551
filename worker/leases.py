"""Keeps the leases of the jobs this worker process runs: renewed every ``lease_renew_seconds``.

A job's lease (``keys.lease``) lapses ``lease_seconds`` after its last renewal; the janitor
then takes the worker for dead and hands the job to another. A renewal that finds another run
holding the job (this worker was taken for dead, e.g. it stalled longer than the lease) marks
the job lost: the engine drops it and nothing more is written for it from here.
"""

from __future__ import annotations

import logging
import threading

import redis

from shared.background import BackgroundThread
from shared.job_store import scripts
from shared.job_store.scripts import JobScripts, RenewAnswer
from shared.settings import Settings
from worker.engine import EngineJob

log = logging.getLogger("streamq.worker")


class LeaseKeeper(BackgroundThread):
    thread_name = "streamq-leases"

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        super().__init__()
        self._redis = connection
        self._every = settings.lease_renew_seconds
        self._lease_ms = int(settings.lease_seconds * 1000)
        self._scripts = JobScripts(connection)
        self._jobs: dict[str, EngineJob] = {}
        self._lock = threading.Lock()

    def hold(self, job: EngineJob) -> None:
        with self._lock:
            self._jobs[job.job_id] = job

    def release(self, job: EngineJob) -> None:
        """Stop renewing ``job``'s lease: this run's, not a later run of the same job that this
        worker took back meanwhile (its lease was taken as lapsed while it stalled)."""
        with self._lock:
            if self._jobs.get(job.job_id) is job:
                del self._jobs[job.job_id]

    def renew(self) -> None:
        with self._lock:
            jobs = list(self._jobs.values())
        if not jobs:
            return
        pipe = self._redis.pipeline(transaction=False)
        for job in jobs:
            self._scripts.run(scripts.renew(job.job_id, run=job.run, lease_ms=self._lease_ms), client=pipe)
        for job, held in zip(jobs, self._scripts.execute(pipe), strict=True):
            if int(held) != RenewAnswer.HELD and not job.lost:
                if int(held) == RenewAnswer.GONE:
                    why = "its record is gone from Redis (expired, or Redis lost its data)"
                else:
                    why = "another worker holds it now"
                log.warning("job %s: %s; dropping it here", job.job_id, why)
                job.lost = True
                job.cancel.set()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self.renew()
            except redis.RedisError as exc:
                log.warning("could not renew job leases: %s", exc)
            except Exception:  # a bug must not end the renewals (every running job would be lost)
                log.exception("could not renew job leases")
