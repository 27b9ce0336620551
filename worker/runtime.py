"""The per-process worker runtime: the loaded model and the threads that serve it.

A StreamqWorker builds one at start-up and installs it; RQ's job function
(``worker.tasks.generate``) finds it here. A job function run by a plain ``rq worker``
(one that loaded no model) gets a clear error instead.
"""

from __future__ import annotations

import redis

from shared.settings import Settings
from worker.backend import ChatBackend
from worker.cancel_watcher import CancelWatcher
from worker.heartbeat import Heartbeat
from worker.job_runner import JobRunner
from worker.prompt_counter import PromptCounter


class WorkerRuntime:
    def __init__(
        self, settings: Settings, connection: redis.Redis, worker_name: str, backend: ChatBackend
    ) -> None:
        self.backend = backend
        self.cancels = CancelWatcher(connection)
        self.heartbeat = Heartbeat(
            connection,
            settings,
            worker_name,
            {
                "model": backend.name,
                "device": backend.device,
                "dtype": backend.dtype,
                "slots": "1",
                "context_length": str(backend.context_length or ""),
            },
        )
        self.counter = PromptCounter(connection, backend)
        self.runner = JobRunner(connection, backend, settings, self.cancels, worker_name)

    def start(self) -> None:
        self.cancels.start()
        self.counter.start()
        self.heartbeat.start()

    def stop(self) -> None:
        self.heartbeat.stop()
        self.counter.stop()
        self.cancels.stop()

    def run_job(self, job_id: str) -> str:
        self.heartbeat.current_job = job_id
        try:
            return self.runner.run(job_id)
        finally:
            self.heartbeat.current_job = ""
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
