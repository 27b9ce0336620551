"""The RQ adapter for running a streamq worker the plain RQ way: the only module that subclasses
RQ (``worker.rq_runs`` is the other that writes RQ's records, with RQ's own primitives).

A StreamqWorker is an RQ SimpleWorker (no fork per job: a forked child could not reuse the CUDA
context) that runs its jobs, one at a time, on a worker runtime's engine: one slot that builds
its own runtime. ``streamq worker`` does not use it (its dispatcher takes jobs for all its slots,
``worker.dispatcher``); it also serves as that process's record in RQ's list of workers::

    STREAMQ_MODEL=/path/to/model rq worker -w worker.rq_worker.StreamqWorker -c worker.rq_config

The job path: RQ's loop takes a job from the model's queue (``streamq:<served name>``) and calls
``Job.perform``; a ``StreamqJob`` runs streamq's task there on the runtime its worker handed it
(``JobRunner.run``, which waits while the engine runs the job), keeps the typed ``Outcome``, and
``handle_job_success`` files it: finished, canceled (RQ's CanceledJobRegistry), handed back to
the front of its queue, or left to the worker that holds it now. A failure raises (JobFailed),
and RQ files it failed. So RQ's registries and ``rq info`` follow each job's real end.

What this module relies on in RQ (hooks, private attributes, signatures) is checked against
the installed RQ by tests/test_rq_interface.py.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol

import redis
from rq import worker_registration
from rq.job import Job
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.timeouts import BaseDeathPenalty
from rq.utils import now as utcnow
from rq.worker import SimpleWorker

from shared import keys
from shared.heap import release_heap, settle_heap
from shared.settings import Settings
from shared.settings_loading import load_settings
from worker.job_runner import Outcome
from worker.rq_runs import file_ending
from worker.runtime import WorkerRuntime, build_runtime, served_name_of
from worker.tasks import TASK
from worker.worker_logging import configure_worker_logging

log = logging.getLogger("streamq.worker")
REANNOUNCE_TRIES = 30  # seconds a plain RQ worker keeps trying to enter RQ's lists again


class JobHost(Protocol):
    """What a StreamqWorker runs its jobs on (a WorkerRuntime)."""

    served_name: str

    def run_job(self, job_id: str, slot_name: str, fields: dict[str, str] | None = None) -> Outcome:
        """Run the job to its end; ``fields``: its state in streamq, when the caller read it."""
        ...


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
            # One line and exit code 2, as for any setting refused (`rq worker` has no --model).
            print("streamq: refusing to start: no model to serve: set STREAMQ_MODEL", file=sys.stderr)
            raise SystemExit(2)
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
        self._engine_stopped = False

    def bootstrap(self, logging_level: str | None = "INFO", *args: Any, **kwargs: Any) -> None:
        if self.runtime is not None:
            super().bootstrap(logging_level, *args, **kwargs)
            return
        # Run on its own (`rq worker -w ...`): its logs are streamq's, RQ's start-up lines too.
        configure_worker_logging(self.settings)
        super().bootstrap(None, *args, **kwargs)  # RQ's loggers keep STREAMQ_LOG_LEVEL
        if (self.settings.slots or 1) > 1:
            log.warning(
                "RQ's worker loop runs one job at a time: STREAMQ_SLOTS=%d is not used", self.settings.slots
            )
        # RQ's loop runs one job at a time: the engine is sized, and the worker says it has, one slot.
        one_slot = self.settings.model_copy(update={"slots": 1})
        try:  # load the model here
            owned = build_runtime(one_slot, self.connection, self.name)
        except BaseException as exc:
            log.error("worker %s could not load %s: %s", self.name, self.settings.model, exc)
            self.register_death()  # no ghost in `rq info`
            raise
        owned.on_forgotten.append(self._reannounce_soon)
        owned.start()
        self.runtime = self._owned = owned
        settle_heap(self.settings)
        backend = owned.backend
        log.info("worker %s serves %s on %s (%s)", self.name, backend.name, backend.device, backend.dtype)

    def reannounce(self) -> None:
        """Redis came back empty (``shared.redis_epoch``): enter RQ's lists of workers and queues
        again, as at the start, or `rq info` shows no worker until the process restarts. A record
        of this name there now is this worker's own, rewritten since by RQ's heartbeat (partial:
        no birth, no queues): it is replaced in one transaction, RQ's birth record with the
        state last written, so RQ's loop, writing beside it, never meets a record half made."""
        self.birth_date = self.last_heartbeat = utcnow()
        with self.connection.pipeline() as pipe:
            pipe.delete(self.key)
            pipe.hset(self.key, mapping={**self.serialize(), "state": self.get_state()})
            pipe.expire(self.key, self.worker_ttl + 60)
            worker_registration.register(self, pipe)
            pipe.sadd(keys.RQ_QUEUES, *(queue.key for queue in self.queues))
            pipe.execute()

    def _reannounce_soon(self) -> None:
        """``reannounce`` from the epoch watch's thread (a plain RQ worker), tried again each
        second for a while: Redis has only just come back."""
        for _ in range(REANNOUNCE_TRIES):
            try:
                self.reannounce()
                return
            except redis.RedisError as exc:
                log.warning("worker %s: could not enter RQ's lists again yet: %s", self.name, exc)
                time.sleep(1.0)
        log.error("worker %s: not in RQ's lists (`rq info`) until it restarts", self.name)

    def teardown(self) -> None:
        if self._owned is not None:
            self._owned.stop()
            self.runtime = self._owned = None
            release_heap()
        super().teardown()

    def subscribe(self) -> None:
        """RQ's subscription to its worker channel (``rq`` commands such as ``kill-horse``), its
        listener thread waking every second instead of every minute. At the stop, RQ unsubscribes
        and stops that thread, and redis-py 8 waits for it: a thread asleep in its minute-long
        wait held the worker's exit for up to 60 s after its warm shutdown."""
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(  # type: ignore[assignment]  # RQ types it None
            sleep_time=1, daemon=True, exception_handler=self._pubsub_exception_handler
        )

    def execute_job(self, job: Job, queue: Queue) -> None:
        if isinstance(job, StreamqJob):
            job.host, job.slot_name = self.runtime, self.name
        super().execute_job(job, queue)
        if self._owned is not None and not self._owned.engine.alive():
            # Its engine stopped (its steps kept failing: worker.engine.EngineBroken): the job was
            # handed back; take no more, so the supervisor starts the worker again.
            log.error("worker %s: its engine has stopped; it takes no more jobs", self.name)
            self._stop_requested = self._engine_stopped = True

    def work(self, *args: Any, **kwargs: Any) -> bool:
        worked = bool(super().work(*args, **kwargs))
        if self._engine_stopped:  # a failure, for a supervisor that restarts failed processes only
            raise SystemExit(1)
        return worked

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
        to that worker (``worker.rq_runs.file_ending``, shared with the dispatcher)."""
        outcome = job.outcome if isinstance(job, StreamqJob) else None
        if outcome is not None:
            if execution is not None:
                self.executions.pop(execution.id, None)
            if file_ending(
                self.connection, job, queue, outcome, execution, result_ttl=self.settings.result_ttl
            ):
                return
        super().handle_job_success(job, queue, started_job_registry, execution)
