"""RQ's record of the jobs a worker process runs: taken, started, and filed as each ended.

A streamq worker takes its jobs itself (``worker.dispatcher``) instead of running an RQ worker
loop per slot, and writes what RQ's worker would have written, with RQ's own primitives, in
one pipeline per step: ``take`` moves ids off the queue into its intermediate list as RQ's
dequeue does; ``begin`` records their executions (RQ's started registry, the job's status,
worker and start time) and reads RQ's record and streamq's state of each job (the id leaves
the intermediate list in streamq's *start* script); ``beat`` renews the running executions;
``end`` files each outcome where RQ would (finished with its result, failed with the error,
canceled, or back at the front of its queue); ``file_counts`` adds the ended runs to the
worker's counters of finished and failed jobs and working time, once a second at most. ``rq
info``, RQ's registries and ``Job.fetch`` then show every job as RQ's own worker would have left
it. RQ's dependents and callbacks are not kept: streamq's jobs have none.

``file_ending`` is shared with ``worker.rq_worker.StreamqWorker`` (the plain ``rq worker -w``
way), so both file canceled, handed-back and lost runs the same way. tests/test_rq_adapter.py
runs both against the installed RQ and compares what each left.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any

from rq.exceptions import NoSuchJobError
from rq.executions import Execution
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import CanceledJobRegistry
from rq.utils import now
from rq.worker import SimpleWorker

from shared import keys
from shared.job_store import scripts
from shared.job_store.rq_ended_records import file_requeued
from shared.job_store.scripts import JobScripts
from shared.job_store.vocabulary import JobField
from shared.job_store.vocabulary import JobStatus as StreamqStatus
from shared.log_format import job_fields
from shared.redis_text import hash_fields, names, text
from worker.job_runner import Outcome

log = logging.getLogger("streamq.worker")

COUNTS_EVERY = 1.0  # seconds between two additions to the worker's counters in RQ
_FINISHED, _FAILED, _WORKING = "successful_job_count", "failed_job_count", "total_working_time"
_COUNTERS = (_FINISHED, _FAILED, _WORKING)


def start_was_lost(connection: Any, job_id: str, queue_key: str) -> bool:
    """A job a run lost is ``queued`` in streamq yet on neither its queue nor the queue's
    intermediate list (another run, a janitor or a handback would have put it on one): a
    failover lost the run's start, and nothing else would ever run it."""
    pipe = connection.pipeline(transaction=False)
    pipe.hget(keys.job(job_id), JobField.STATUS)
    pipe.lpos(queue_key, job_id)
    pipe.lpos(keys.intermediate(queue_key), job_id)
    status, queued_at, parked_at = pipe.execute()
    return text(status) == StreamqStatus.QUEUED and queued_at is None and parked_at is None


def file_ending(
    connection: Any, job: Job, queue: Queue, outcome: Outcome, execution: Execution | None, *, result_ttl: int
) -> bool:
    """File a run that ended canceled, handed back or lost (RQ has no word for these); False for
    an outcome RQ files as finished, which is left to the caller. ``execution`` is the run's
    record in RQ's started registry, removed here."""
    model = str(job.origin).removeprefix(keys.queue_name(""))
    if outcome in (Outcome.REQUEUED, Outcome.LOST):
        if execution is not None:
            with connection.pipeline() as pipe:
                execution.delete(job=job, pipeline=pipe)
                pipe.execute()
        if outcome is Outcome.LOST and start_was_lost(connection, job.id, queue.key):
            # A failover lost this run's start: streamq has the job queued on no list, and
            # nothing else would ever run it. Back to its queue's front, RQ's own way.
            queue.enqueue_job(job, at_front=True)
            log.warning(
                "job %s: Redis lost its start (a failover?); queued again",
                job.id,
                extra=job_fields("requeued", job.id, model, worker=str(job.worker_name), reason="start_lost"),
            )
        elif outcome is Outcome.REQUEUED:
            # The handback script already put the one copy of the id back on the queue's front,
            # so a kill here strands nothing; RQ's record follows, with no second push (RQ's own
            # enqueue pushed one, which a worker with a free slot could take before it was
            # dropped: the job delivered twice).
            file_requeued(connection, job, executions=False)  # the run's went above
            log.info(
                "job %s: handed back to its queue",
                job.id,
                extra=job_fields("requeued", job.id, model, reason="worker_stopping"),
            )
        return True
    if outcome is not Outcome.CANCELED:
        return False
    with connection.pipeline() as pipe:
        job.set_status(JobStatus.CANCELED, pipeline=pipe)
        job.cleanup(ttl=result_ttl, pipeline=pipe, remove_from_queue=False)
        if execution is not None:
            execution.delete(job=job, pipeline=pipe)
        CanceledJobRegistry(job.origin, connection, job_class=type(job), serializer=job.serializer).add(
            job, ttl=result_ttl, pipeline=pipe
        )
        pipe.execute()
    return True


def _restore_taken(job: Job, record: dict[Any, Any]) -> None:
    """Load RQ's record of ``job`` as it was taken (``Job.restore``), keeping what its start
    (``prepare_for_execution``, in the same pipeline) set in the record and on ``job``."""
    if not record:
        raise NoSuchJobError(job.id)
    started = (job.worker_name, job.last_heartbeat, job.started_at, job.get_status(refresh=False))
    job.restore(record)  # NoSuchJobError for a record without its data
    job.worker_name, job.last_heartbeat, job.started_at, job._status = started


@dataclass
class Run:
    """One job taken off the queue: RQ's job (None when RQ's record is gone), its execution, and
    streamq's state of the job as the run's start read it (None: not read)."""

    job_id: str
    job: Job | None = None
    execution: Execution | None = None
    fields: dict[str, str] | None = None


class RqRuns:
    """RQ's side of the runs of one worker process on its queue: ``worker`` is the process's
    record in RQ's list of workers (its name goes on every execution; its counters of finished
    and failed jobs and of working time follow each end, as ``rq info`` shows them)."""

    def __init__(self, connection: Any, worker: SimpleWorker, *, result_ttl: int, job_timeout: int) -> None:
        self._redis = connection
        self._worker = worker
        self.queue: Queue = worker.queues[0]
        self._parked = keys.intermediate(self.queue.key)
        self._result_ttl = result_ttl
        # How long RQ's started registry holds a run between beats (RQ's SimpleWorker rule: the
        # job's timeout, the front's STREAMQ_JOB_TIMEOUT, plus a minute).
        self._run_ttl = job_timeout + 60
        self._scripts = JobScripts(connection)
        self._counts_lock = threading.Lock()
        self._unfiled: dict[str, float] = dict.fromkeys(_COUNTERS, 0.0)  # not yet added in RQ
        self._counts_filed_at = time.monotonic()

    @property
    def worker_name(self) -> str:
        return str(self._worker.name)

    def take(self, most: int, wait: float | None) -> list[str]:
        """Job ids off the queue's head, each into the intermediate list (RQ's dequeue: a worker
        killed before ``begin`` leaves them there for the janitor). With ``wait``: the first to
        come within ``wait`` seconds, alone, so that it starts at once; without: up to ``most``
        of those queued now, in one round trip (the ``take`` script)."""
        if most <= 0:
            return []
        if wait is None:
            return names(self._scripts.run(scripts.take(self.queue.key, most)))
        first = self._redis.blmove(self.queue.key, self._parked, wait, "LEFT", "RIGHT")
        return [] if first is None else names([first])

    def put_back(self, job_ids: list[str]) -> None:
        """Return taken ids, never begun, to their queue's head in their order (a worker asked to
        stop while it waited for them): RQ's record of each is still the queued one."""
        self._scripts.run(scripts.put_back(self.queue.key, job_ids))

    def begin(self, job_ids: list[str]) -> list[Run]:
        """RQ's start of each job, as its worker records it (an execution in the started registry;
        the job started by this worker), RQ's whole record as taken (its end writes it back whole,
        as RQ's worker does with what its dequeue read) and streamq's state of each job read for
        its run: one pipeline for them all. Each id stays in the intermediate list until
        streamq's start takes it off (the *start* script), so a worker killed before that leaves
        it to the janitor."""
        jobs = [Job(job_id, connection=self._redis, serializer=self.queue.serializer) for job_id in job_ids]
        runs = [Run(job.id, job) for job in jobs]
        with self._redis.pipeline(transaction=False) as pipe:
            for job in jobs:  # the reads first: they see each job as it was taken
                pipe.hgetall(job.key)
                pipe.hgetall(keys.job(job.id))
            for job, run in zip(jobs, runs, strict=True):
                job.origin = self.queue.name
                run.execution = Execution.create(
                    job, self._run_ttl, pipeline=pipe, worker_name=self.worker_name
                )
                job.prepare_for_execution(self.worker_name, pipeline=pipe)
            replies = pipe.execute()
        lost: list[tuple[Run, Job]] = []
        for job, run, record, fields in zip(
            jobs, runs, replies[0 : 2 * len(runs) : 2], replies[1 : 2 * len(runs) : 2], strict=True
        ):
            run.fields = hash_fields(fields)
            try:  # RQ's whole record as taken, for its end (written back whole, as RQ's worker
                _restore_taken(job, record)  # does with the record its dequeue read)
            except NoSuchJobError:  # RQ's record was gone (a failover lost it), or is a stub
                lost.append((run, job))  # a killed begin left: the start above made one
        if lost:
            with self._redis.pipeline(transaction=False) as pipe:
                for run, job in lost:
                    if run.execution is not None:
                        run.execution.delete(job=job, pipeline=pipe)
                    pipe.delete(job.key)
                    run.job = run.execution = None
                pipe.execute()
        return runs

    def beat(self, runs: list[Run]) -> None:
        """Renew the running runs in RQ's started registry, as RQ's worker does while it runs a
        job (its maintenance fails a run whose entry lapsed)."""
        registry = self.queue.started_job_registry
        with self._redis.pipeline(transaction=False) as pipe:
            for run in runs:
                if run.execution is not None:
                    run.execution.heartbeat(registry, self._run_ttl, pipe)
            pipe.execute()

    def end(self, run: Run, outcome: Outcome | None, error: BaseException | None = None) -> None:
        """File the run's end in RQ: ``outcome``, or failed with ``error`` when it is None."""
        job = run.job
        if job is None:
            return
        if outcome is not None and file_ending(
            self._redis, job, self.queue, outcome, run.execution, result_ttl=self._result_ttl
        ):
            return
        execution = run.execution
        job.ended_at = now()
        result_ttl = job.get_result_ttl(self._result_ttl)
        with self._redis.pipeline() as pipe:
            run_record = {
                "pipeline": pipe,
                "worker_name": self.worker_name,
                "execution_id": execution.id if execution else None,
                "execution_started_at": execution.created_at if execution else None,
                "execution_ended_at": job.ended_at,
            }
            if outcome is None:
                job.set_status(JobStatus.FAILED, pipeline=pipe)
                detail = "".join(traceback.format_exception(error)) if error else "failed"
                job._handle_failure(detail, **run_record)
            else:
                job._result = outcome.value  # RQ keeps the final status as the job's result
                job._handle_success(result_ttl, **run_record)
                pipe.expire(job.key, result_ttl)
            if execution is not None:
                execution.delete(job=job, pipeline=pipe)
            pipe.execute()
        working = (job.ended_at - job.started_at).total_seconds() if job.started_at is not None else 0.0
        with self._counts_lock:
            self._unfiled[_FAILED if outcome is None else _FINISHED] += 1
            self._unfiled[_WORKING] += working

    def file_counts(self, force: bool = False) -> None:
        """Add the runs ended since the last call to the worker's counters in RQ (its finished and
        failed jobs and its working time, as ``rq info`` shows them): at most once every
        ``COUNTS_EVERY`` seconds, not at every job's end, unless ``force``d (the worker's last)."""
        now_ = time.monotonic()
        with self._counts_lock:
            if not force and now_ - self._counts_filed_at < COUNTS_EVERY:
                return
            unfiled, self._unfiled = self._unfiled, dict.fromkeys(_COUNTERS, 0.0)
            self._counts_filed_at = now_
        if not any(unfiled.values()):
            return
        try:
            with self._redis.pipeline(transaction=False) as pipe:
                if unfiled[_FINISHED]:
                    pipe.hincrby(self._worker.key, _FINISHED, int(unfiled[_FINISHED]))
                if unfiled[_FAILED]:
                    pipe.hincrby(self._worker.key, _FAILED, int(unfiled[_FAILED]))
                if unfiled[_WORKING]:
                    pipe.hincrbyfloat(self._worker.key, _WORKING, unfiled[_WORKING])
                pipe.execute()
        except Exception:  # counted again at the next call
            with self._counts_lock:
                for name, value in unfiled.items():
                    self._unfiled[name] += value
            raise
