"""Jobs RQ handed out that no streamq run ever started, found and put right by the janitor.

RQ's worker moves a job from its queue list into the queue's *intermediate* list (BLMOVE) and
only then starts it; a worker killed in between leaves the job there, still ``queued`` in
streamq, with nothing to run it (RQ's own maintenance would fail it ten minutes later). A live
worker moves a job out of that list within milliseconds, so a job seen there on two janitor
rounds in a row was taken by a worker that died (or froze) before starting it: it goes back to
the front of its queue. Should the frozen worker wake, START's fencing lets one run hold it.

The janitor also keeps RQ's record and streamq's in step: a job RQ has failed (its maintenance,
or a crash outside streamq's run) while streamq still has it queued or running with no live
lease ends ``failed`` with an ``error`` event, so its followers stop.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job
from rq.queue import Queue
from rq.registry import FailedJobRegistry, StartedJobRegistry

from shared import keys
from shared.job_store import scripts
from shared.job_store.scripts import Answer, JobScripts, ended_failed
from shared.job_store.vocabulary import FINAL_STATUSES, JobField, JobStatus
from shared.log_format import job_fields
from shared.redis_text import names, text
from shared.settings import Settings

log = logging.getLogger("streamq.janitor")


class StrandedJobs:
    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        self._redis = connection
        self._settings = settings
        self._scripts = JobScripts(connection)
        self._seen: set[tuple[str, str]] = set()  # (intermediate list, job id) seen last round
        self._failed_mark: dict[str, float] = {}  # failed registry -> highest score checked

    def queues(self) -> list[Queue]:
        """Every model's RQ queue (RQ lists the queues it has seen in ``rq:queues``)."""
        prefix = keys.rq_queue("")
        lists = sorted(n for n in names(self._redis.smembers(keys.RQ_QUEUES)) if n.startswith(prefix))
        return [Queue(keys.rq_queue_name(n), connection=self._redis) for n in lists]

    def sweep(self) -> list[str]:
        """One round over every model's queue; returns the ids of the jobs queued again."""
        queues = self.queues()
        rescued = self.rescue_taken(queues)
        self.end_failed_in_rq(queues)
        return rescued

    # ----- taken, never started -------------------------------------------------------------------
    def rescue_taken(self, queues: list[Queue]) -> list[str]:
        seen: set[tuple[str, str]] = set()
        rescued: list[str] = []
        for queue in queues:
            parked = keys.intermediate(queue.key)
            for job_id in names(self._redis.lrange(parked, 0, -1)):
                if (parked, job_id) not in self._seen:
                    seen.add((parked, job_id))  # a live worker starts it before the next round
                elif self._rescue(queue, parked, job_id):
                    rescued.append(job_id)
                else:
                    seen.add((parked, job_id))
        self._seen = seen
        return rescued

    def _rescue(self, queue: Queue, parked: str, job_id: str) -> bool:
        """Requeue one job stuck in ``parked``; False when it is not streamq's to requeue now."""
        status = text(self._redis.hget(keys.job(job_id), JobField.STATUS))
        if status is None or status in FINAL_STATUSES:
            self._redis.lrem(parked, 1, job_id)  # ended (or gone): nothing is left to run
            return False
        if status != JobStatus.QUEUED:
            return False  # running under a run of its own: the lease decides
        model = queue.name.removeprefix(keys.queue_name(""))
        try:
            job = Job.fetch(job_id, connection=self._redis)
        except NoSuchJobError:
            self._redis.lrem(parked, 1, job_id)
            self._end_failed(job_id, model, "its queue record was lost before any worker started it")
            return False
        # The dead worker's execution of it, if it got as far as RQ's record of its run: else it
        # stays in RQ's started registry, whose cleaning fails the job once another worker runs it.
        StartedJobRegistry(queue=queue).remove_executions(job)
        # Into the queue first, then off the parked list: a janitor dying in between leaves the
        # job in both (a later round drops the parked copy), never in neither.
        queue.enqueue_job(job, at_front=True)
        self._redis.lrem(parked, 1, job_id)
        log.warning(
            "janitor: job %s was taken by a worker that died before starting it; queued again",
            job_id,
            extra=job_fields("requeued", job_id, model, reason="worker_lost_before_start"),
        )
        return True

    # ----- failed by RQ, live in streamq ------------------------------------------------------------
    def end_failed_in_rq(self, queues: list[Queue]) -> list[str]:
        """End the jobs RQ failed since the last round that streamq still has live (no lease)."""
        ended = []
        for queue in queues:
            registry = FailedJobRegistry(queue=queue)
            mark = self._failed_mark.get(registry.key, float("-inf"))
            found: Any = self._redis.zrangebyscore(registry.key, f"({mark}", "+inf", withscores=True)
            entries: list[tuple[Any, float]] = list(found)
            if not entries:
                continue
            self._failed_mark[registry.key] = max(score for _, score in entries)
            model = queue.name.removeprefix(keys.queue_name(""))
            job_ids = [name.split(":", 1)[0] for name in names(member for member, _ in entries)]
            pipe = self._redis.pipeline(transaction=False)
            for job_id in job_ids:
                pipe.hget(keys.job(job_id), JobField.STATUS)
                pipe.exists(keys.lease(job_id))
            answers = pipe.execute()
            for job_id, status, leased in zip(job_ids, answers[::2], answers[1::2], strict=True):
                if text(status) in (JobStatus.QUEUED, JobStatus.RUNNING) and not leased:
                    self._end_failed(job_id, model, "the job queue gave up on it (RQ failed the job)")
                    ended.append(job_id)
        return ended

    def _end_failed(self, job_id: str, model: str, message: str) -> None:
        s = self._settings
        ending = ended_failed("job_lost", message)
        finish = scripts.finish(job_id, ending, ttl=s.result_ttl, maxlen=s.stream_maxlen)
        answer = scripts.answer(self._scripts.run(finish))
        if answer == Answer.OK:
            log.error(
                "janitor: job %s failed: %s",
                job_id,
                message,
                extra=job_fields("failed", job_id, model, reason="job_lost"),
            )
