"""StreamqWorker: an RQ worker that loads the model once and runs jobs in its own process.

It is a SimpleWorker (no fork per job: a forked child could not reuse the CUDA context),
so it also runs the RQ way::

    STREAMQ_MODEL=/path/to/model rq worker -w worker.rq_worker.StreamqWorker -u redis://...

It always listens on its model's queue (``streamq:<served name>``), shows up in ``rq info``,
and files canceled jobs in RQ's CanceledJobRegistry rather than as finished.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.worker import SimpleWorker

from shared import keys
from shared.settings import Settings, load_settings
from worker import runtime
from worker.backend import ChatBackend
from worker.job_runner import CANCELED
from worker.model_loading import configure_threads, default_served_name, load_backend, resolve_device

log = logging.getLogger("streamq.worker")


class StreamqWorker(SimpleWorker):
    def __init__(
        self,
        queues: Any = None,
        *args: Any,
        settings: Settings | None = None,
        backend: ChatBackend | None = None,
        **kwargs: Any,
    ) -> None:
        self.settings = settings or load_settings()
        if backend is None and not self.settings.model:
            raise ValueError("no model to serve: pass --model or set STREAMQ_MODEL")
        served = (
            backend.name
            if backend
            else (self.settings.served_name or default_served_name(self.settings.model or ""))
        )
        queue = keys.queue_name(served)
        given = queues if isinstance(queues, list | tuple) else [queues] if queues else []
        asked = [q if isinstance(q, str) else q.name for q in given]
        if asked not in ([], [queue], ["default"]):
            log.warning(
                "a StreamqWorker listens on its model's queue %s, not %s", queue, ", ".join(map(str, asked))
            )
        super().__init__([queue], *args, **kwargs)
        self.served_name = served
        self._backend = backend
        self.runtime: runtime.WorkerRuntime | None = None

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        backend = self._backend
        if backend is None:
            s = self.settings
            try:
                configure_threads(resolve_device(s.device), s.torch_threads)
                trust = s.trust_remote_code
                backend = load_backend(s.model or "", s.device, s.dtype, self.served_name, trust)
            except BaseException as exc:
                log.error("worker %s could not load %s: %s", self.name, s.model, exc)
                self.register_death()  # no ghost in `rq info`
                raise
        self.runtime = runtime.WorkerRuntime(self.settings, self.connection, self.name, backend)
        self.runtime.start()
        runtime.install(self.runtime)
        log.info("worker %s serves %s on %s (%s)", self.name, backend.name, backend.device, backend.dtype)

    def teardown(self) -> None:
        if self.runtime is not None:
            self.runtime.stop()
            runtime.install(None)
            self.runtime = None
        super().teardown()

    def clean_registries(self) -> None:
        """RQ's own cleaning, and the canceled registry's, which RQ leaves to grow."""
        super().clean_registries()
        for queue in self.queues:
            registry = CanceledJobRegistry(queue.name, self.connection, job_class=self.job_class)
            self.connection.zremrangebyscore(registry.key, 0, time.time())

    def handle_job_success(
        self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry, execution: Any
    ) -> None:
        """A job that ended canceled goes to RQ's canceled registry, not the finished one."""
        if job._result != CANCELED:
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
        log.info("job %s: canceled", job.id)
