"""The per-process worker runtime: the loaded model, its engine and the threads that serve it.

A worker process builds one at start-up and installs it; RQ's job function
(``worker.tasks.generate``) finds it here, in whichever slot thread runs the job. A job
function run by a plain ``rq worker`` (one that loaded no model) gets a clear error instead.
"""

from __future__ import annotations

import logging
import threading

import redis

from shared.settings import Settings
from worker.backend import ServedModel
from worker.cancel_watcher import CancelWatcher
from worker.engine import BatchModel, Engine
from worker.heartbeat import Heartbeat
from worker.janitor import Janitor
from worker.job_runner import JobRunner
from worker.leases import LeaseKeeper
from worker.metrics import WorkerMetrics
from worker.prompt_counter import PromptCounter
from worker.step_publisher import StepPublisher

log = logging.getLogger("streamq.worker")


class WorkerRuntime:
    def __init__(
        self,
        settings: Settings,
        connection: redis.Redis,
        worker_name: str,
        backend: ServedModel,
        model: BatchModel,
        context_length: int | None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self.metrics = WorkerMetrics(backend.name)
        self.metrics.describe_worker(
            worker=worker_name, model=backend.name, device=backend.device, dtype=backend.dtype
        )
        self.metrics.watch_slots(model.slots, lambda: len(self._running))
        self.cancels = CancelWatcher(connection)
        self.publisher = StepPublisher(connection, settings, self.metrics)
        self.engine = Engine(model, self.publisher, self.metrics.engine_step.observe)
        self.heartbeat = Heartbeat(
            connection,
            settings,
            worker_name,
            {
                "model": backend.name,
                "device": backend.device,
                "dtype": backend.dtype,
                "slots": str(model.slots),
                "engine": model.engine,
                "features": ",".join(sorted(model.features)),
                "context_length": str(context_length or ""),
            },
        )
        self.counter = PromptCounter(connection, backend)
        self.leases = LeaseKeeper(connection, settings)
        self.janitor = Janitor(connection, settings)
        self.runner = JobRunner(
            connection,
            self.engine,
            self.publisher,
            settings,
            self.cancels,
            self.leases,
            worker_name,
            self.metrics,
        )
        self._running: dict[str, str] = {}
        self._lock = threading.Lock()

    def start(self, engine_thread: bool = True) -> None:
        """Start the helper threads, and the engine in a thread of its own unless the caller
        runs it (``engine.run()``) in the thread that loaded the model."""
        port = self.metrics.serve(self.settings.metrics_host, self.settings.metrics_port)
        self.heartbeat.publish(metrics_port=str(port or ""))  # `streamq status` shows it
        self.cancels.start()
        self.counter.start()
        self.publisher.start()
        if engine_thread:
            self.engine.start()
        self.leases.start()
        self.heartbeat.start()
        self.janitor.start()

    def stop(self) -> None:
        """Stop the engine (jobs it still holds go back to their queue), write what is left, leave
        the worker list."""
        helpers = (self.janitor, self.counter, self.cancels)
        for helper in helpers:
            helper.request_stop()
        self.engine.stop()
        self.publisher.stop()
        self.leases.stop()
        self.heartbeat.stop()
        for helper in helpers:
            helper.stop()
        self.metrics.close()

    def run_job(self, job_id: str, slot_name: str) -> str:
        with self._lock:
            self._running[job_id] = slot_name
            self.heartbeat.current_job = ",".join(self._running)
        status = "failed"  # JobFailed, or anything else the run raised
        try:
            status = self.runner.run(job_id, slot_name)
            return status
        finally:
            self.metrics.job_ended(status)
            with self._lock:
                self._running.pop(job_id, None)
                self.heartbeat.current_job = ",".join(self._running)
                self.heartbeat.jobs_done += 1


_installed: WorkerRuntime | None = None


def install(runtime: WorkerRuntime | None) -> None:
    global _installed
    _installed = runtime


def current() -> WorkerRuntime:
    if _installed is None:
        raise RuntimeError(
            "no model is loaded in this process: run jobs with `streamq worker` or "
            "`rq worker -w worker.rq_worker.StreamqWorker` (a plain `rq worker` cannot run them)"
        )
    return _installed
