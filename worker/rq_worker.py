"""The RQ adapter: the only module that subclasses RQ or touches its private API.

A StreamqWorker is an RQ SimpleWorker (no fork per job: a forked child could not reuse the CUDA
context) that runs its jobs on a worker runtime's engine. ``streamq worker --slots K`` runs K
of them (``SlotWorker``) as threads of one process, around one runtime (see ``slot_pool``); it
also runs the plain RQ way, as one slot that builds its own runtime::

    STREAMQ_MODEL=/path/to/model rq worker -w worker.rq_worker.StreamqWorker -u redis://...

The job path: RQ's loop takes a job from the model's queue (``streamq:<served name>``) and calls
``Job.perform``; a ``StreamqJob`` runs streamq's task there on the runtime its worker handed it
(``JobRunner.run``, which waits while the engine runs the job), keeps the typed ``Outcome``, and
``handle_job_success`` files it: finished, canceled (RQ's CanceledJobRegistry), handed back to
the front of its queue, or left to the worker that holds it now. A failure raises (JobFailed),
and RQ files it failed. So RQ's registries and ``rq info`` follow each job's real end.

What this module relies on in RQ (hooks, private attributes, signatures) is checked against
the installed RQ by tests/test_rq_adapter.py.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Protocol

from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.timeouts import BaseDeathPenalty
from rq.worker import SimpleWorker

from shared import keys
from shared.job_store.vocabulary import JobField
from shared.job_store.vocabulary import JobStatus as StreamqStatus
from shared.log_format import job_fields
from shared.redis_text import text
from shared.settings import Settings, load_settings
from worker.job_runner import Outcome
from worker.runtime import WorkerRuntime, build_runtime, served_name_of
from worker.tasks import TASK

log = logging.getLogger("streamq.worker")

IDLE_POLL = 5  # seconds an idle slot blocks on its queue before looking at a stop request
IDLE_BEAT_EVERY = 30.0  # seconds between a slot's idle RQ heartbeats (RQ's keys live 480 s a beat)


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


class JobHost(Protocol):
    """What a StreamqWorker runs its jobs on (a WorkerRuntime)."""

    served_name: str

    def run_job(self, job_id: str, slot_name: str) -> Outcome: ...


class EngineDeadline(BaseDeathPenalty):
    """No RQ timer: the engine stops a job at its deadline (finish_reason "timeout") itself."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


class StreamqJob(Job):
    """An RQ job run on the engine of the worker that took it: the worker hands it its host
    before RQ performs it; RQ's ``perform`` then runs streamq's task on that host, and the job
    keeps the typed outcome for the worker. A job naming another function runs the RQ way."""

    host: JobHost | None = None
    slot_name: str = ""
    outcome: Outcome | None = None

    def _execute(self) -> Any:  # RQ's Job.perform() calls it to run the job's function
        if self.host is None or self.func_name != TASK:
            return super()._execute()
        (job_id,) = self.args
        self.outcome = self.host.run_job(job_id, self.slot_name)
        return self.outcome.value  # RQ keeps the final status as the job's result


class StreamqWorker(SimpleWorker):
    death_penalty_class = EngineDeadline

    def __init__(
        self,
        queues: Any = None,
        *args: Any,
        settings: Settings | None = None,
        runtime: JobHost | None = None,
        **kwargs: Any,
    ) -> None:
        self.settings = settings or load_settings()
        if runtime is None and self.settings.backend == "model" and not self.settings.model:
            raise ValueError("no model to serve: pass --model or set STREAMQ_MODEL")
        served = runtime.served_name if runtime else served_name_of(self.settings)
        queue = keys.queue_name(served)
        given = queues if isinstance(queues, list | tuple) else [queues] if queues else []
        asked = [q if isinstance(q, str) else q.name for q in given]
        if asked not in ([], [queue], ["default"]):
            log.warning(
                "a StreamqWorker listens on its model's queue %s, not %s", queue, ", ".join(map(str, asked))
            )
        kwargs["job_class"] = StreamqJob  # `rq worker` passes its default (rq.job.Job) by name
        super().__init__([queue], *args, **kwargs)
        self.served_name = served
        self.runtime = runtime
        self._owned: WorkerRuntime | None = None  # the runtime it built itself (`rq worker -w`)

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        if self.runtime is not None:
            return
        try:  # run on its own (`rq worker -w ...`): load the model here
            owned = build_runtime(self.settings, self.connection, self.name)
        except BaseException as exc:
            log.error("worker %s could not load %s: %s", self.name, self.settings.model, exc)
            self.register_death()  # no ghost in `rq info`
            raise
        owned.start()
        self.runtime = self._owned = owned
        backend = owned.backend
        log.info("worker %s serves %s on %s (%s)", self.name, backend.name, backend.device, backend.dtype)

    def teardown(self) -> None:
        if self._owned is not None:
            self._owned.stop()
            self.runtime = self._owned = None
        super().teardown()

    def execute_job(self, job: Job, queue: Queue) -> None:
        if isinstance(job, StreamqJob):
            job.host, job.slot_name = self.runtime, self.name
        super().execute_job(job, queue)

    def clean_registries(self) -> None:
        """RQ's own cleaning, and the canceled registry's, which RQ leaves to grow."""
        super().clean_registries()
        for queue in self.queues:
            registry = CanceledJobRegistry(queue.name, self.connection, job_class=self.job_class)
            self.connection.zremrangebyscore(registry.key, 0, time.time())

    def handle_job_success(
        self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry, execution: Any
    ) -> None:
        """A job that ended canceled goes to RQ's canceled registry, not the finished one; a job
        handed back goes to the front of its queue again; a job another worker took over is left
        to that worker."""
        outcome = job.outcome if isinstance(job, StreamqJob) else None
        if outcome in (Outcome.REQUEUED, Outcome.LOST):
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.execute()
            if outcome is Outcome.LOST and start_was_lost(self.connection, job.id, queue.key):
                # A failover lost this run's start: streamq has the job queued on no list, and
                # nothing else would ever run it. Back to its queue's front, RQ's own way.
                queue.enqueue_job(job, at_front=True)
                log.warning(
                    "job %s: Redis lost its start (a failover?); queued again",
                    job.id,
                    extra=job_fields(
                        "requeued", job.id, self.served_name, worker=self.name, reason="start_lost"
                    ),
                )
                return
            if outcome is Outcome.REQUEUED:
                # The handback script already put the id back on the queue's front, so a kill
                # here strands nothing. RQ's enqueue writes its record and pushes the id again;
                # the script's copy, next in line, is then dropped (if a worker already took
                # it, this drops the new one instead: either way the job is delivered once).
                queue.enqueue_job(job, at_front=True)
                self.connection.lrem(queue.key, -1, job.id)
                model = str(job.origin).removeprefix(keys.queue_name(""))
                log.info(
                    "job %s: handed back to its queue",
                    job.id,
                    extra=job_fields("requeued", job.id, model, worker=self.name, reason="worker_stopping"),
                )
            return
        if outcome is not Outcome.CANCELED:
            super().handle_job_success(job, queue, started_job_registry, execution)
            return
        with self.connection.pipeline() as pipe:
            job.set_status(JobStatus.CANCELED, pipeline=pipe)
            job.cleanup(ttl=self.settings.result_ttl, pipeline=pipe, remove_from_queue=False)
            self.cleanup_execution(job, pipeline=pipe, execution=execution)
            CanceledJobRegistry(
                job.origin, self.connection, job_class=self.job_class, serializer=self.serializer
            ).add(job, ttl=self.settings.result_ttl, pipeline=pipe)
            pipe.execute()
        log.debug("job %s: canceled (RQ registry)", job.id)


class SlotWorker(StreamqWorker):
    """A StreamqWorker that runs in a thread of the slot pool, around the pool's runtime. It
    installs no signal handlers and uses no SIGALRM timer (the pool's main thread takes the
    signals; the engine enforces deadlines)."""

    _idle_beat_due = 0.0  # monotonic time of the slot's next idle RQ heartbeat
    _written_state = ""

    def _install_signal_handlers(self) -> None:
        pass  # the pool's main thread handles signals

    def subscribe(self) -> None:
        pass  # RQ's per-worker command channel: the pool is stopped with signals instead

    def procline(self, message: str) -> None:
        pass  # one process title for the whole pool

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        """RQ's heartbeat (the slot's key and its executions set live ``timeout`` more seconds).
        An idle beat (RQ's default TTL, sent on its own) comes at most every IDLE_BEAT_EVERY
        seconds: RQ sends two around every job, three commands each, which at hundreds of jobs
        a second was a large share of a job's Redis traffic. A job's beat is always sent."""
        idle = timeout is None and pipeline is None
        if idle and time.monotonic() < self._idle_beat_due:
            return
        super().heartbeat(timeout, pipeline)
        if idle:
            self._idle_beat_due = time.monotonic() + IDLE_BEAT_EVERY

    def set_state(self, state: str, pipeline: Any = None) -> None:
        """RQ's state write, skipped when the slot's state is already that (RQ writes "idle" twice
        after each job)."""
        if state == self._written_state and pipeline is None:
            return
        super().set_state(state, pipeline)
        self._written_state = state

    def stop_taking_jobs(self) -> None:
        """Take no new job: the running one ends, then ``work`` returns (within IDLE_POLL when idle)."""
        self._stop_requested = True

    def dequeue_job_and_maintain_ttl(
        self, timeout: int | None, max_idle_time: int | None = None
    ) -> tuple[Job, Queue] | None:
        """RQ's dequeue, in waits of IDLE_POLL seconds, so that a stop request is seen while idle
        (each wait costs an idle slot a few Redis commands: with hundreds of slots, waits of a
        second kept the process busy enough to slow its own job dispatch)."""
        if timeout is None:  # burst: one look at the queue
            return super().dequeue_job_and_maintain_ttl(timeout, max_idle_time)
        while not self._stop_requested:
            result = super().dequeue_job_and_maintain_ttl(timeout, max_idle_time=IDLE_POLL)
            if result is not None:
                return result
        raise StopRequested()
