"""StreamqWorker: an RQ worker that runs its jobs on the process's engine.

It is a SimpleWorker (no fork per job: a forked child could not reuse the CUDA context).
``streamq worker --slots K`` runs K of them as threads of one process, around one engine
(see ``slot_pool``); it also runs the plain RQ way, as one slot::

    STREAMQ_MODEL=/path/to/model rq worker -w worker.rq_worker.StreamqWorker -u redis://...

It always listens on its model's queue (``streamq:<served name>``), shows up in ``rq info``,
and files canceled jobs in RQ's CanceledJobRegistry rather than as finished.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import redis
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.timeouts import BaseDeathPenalty
from rq.worker import SimpleWorker

from shared import keys
from shared.log_format import job_fields
from shared.settings import Settings, load_settings
from worker import runtime
from worker.backend import ServedModel
from worker.job_runner import CANCELED, LOST, REQUEUED
from worker.model_loading import configure_threads, default_served_name, load_backend, resolve_device

log = logging.getLogger("streamq.worker")


class EngineDeadline(BaseDeathPenalty):
    """No RQ timer: the engine stops a job at its deadline (finish_reason "timeout") itself."""

    def setup_death_penalty(self) -> None:
        pass

    def cancel_death_penalty(self) -> None:
        pass


def served_name_of(settings: Settings) -> str:
    if settings.served_name:
        return settings.served_name
    if settings.backend == "synthetic":
        return "synthetic"
    return default_served_name(settings.model or "")


def load_worker_backend(settings: Settings, served: str) -> ServedModel:
    """The model this worker serves (loaded once), or the synthetic stand-in."""
    if settings.backend == "synthetic":
        from worker.synthetic import SyntheticBackend

        return SyntheticBackend(served, settings.synthetic_tokens_per_second, settings.synthetic_text)
    if settings.backend != "model":
        raise ValueError(f"backend must be 'model' or 'synthetic', not {settings.backend!r}")
    if not settings.model:
        raise ValueError("no model to serve: pass --model or set STREAMQ_MODEL")
    from worker.engine_choice import choose_engine

    device = resolve_device(settings.device)
    engine = choose_engine(settings, device)
    log.info("engine: %s (STREAMQ_ENGINE=%s)", engine, settings.engine)
    if engine == "vllm":
        from worker.vllm_engine import load_vllm_served

        return load_vllm_served(settings, served, device)
    configure_threads(device, settings.torch_threads)
    return load_backend(settings.model, settings.device, settings.dtype, served, settings.trust_remote_code)


def build_runtime(
    settings: Settings, connection: redis.Redis, name: str, backend: ServedModel
) -> runtime.WorkerRuntime:
    from worker.engine_setup import build_model

    model, max_len = build_model(settings, backend)
    return runtime.WorkerRuntime(settings, connection, name, backend, model, max_len)


class StreamqWorker(SimpleWorker):
    death_penalty_class = EngineDeadline

    def __init__(
        self,
        queues: Any = None,
        *args: Any,
        settings: Settings | None = None,
        worker_runtime: runtime.WorkerRuntime | None = None,
        **kwargs: Any,
    ) -> None:
        self.settings = settings or load_settings()
        if worker_runtime is None and self.settings.backend == "model" and not self.settings.model:
            raise ValueError("no model to serve: pass --model or set STREAMQ_MODEL")
        served = worker_runtime.backend.name if worker_runtime else served_name_of(self.settings)
        queue = keys.queue_name(served)
        given = queues if isinstance(queues, list | tuple) else [queues] if queues else []
        asked = [q if isinstance(q, str) else q.name for q in given]
        if asked not in ([], [queue], ["default"]):
            log.warning(
                "a StreamqWorker listens on its model's queue %s, not %s", queue, ", ".join(map(str, asked))
            )
        super().__init__([queue], *args, **kwargs)
        self.served_name = served
        self.runtime = worker_runtime
        self._owns_runtime = worker_runtime is None

    def bootstrap(self, *args: Any, **kwargs: Any) -> None:
        super().bootstrap(*args, **kwargs)
        if self.runtime is not None:
            return
        try:  # run on its own (`rq worker -w ...`): load the model here
            backend = load_worker_backend(self.settings, self.served_name)
        except BaseException as exc:
            log.error("worker %s could not load %s: %s", self.name, self.settings.model, exc)
            self.register_death()  # no ghost in `rq info`
            raise
        self.runtime = build_runtime(self.settings, self.connection, self.name, backend)
        self.runtime.start()
        runtime.install(self.runtime)
        log.info("worker %s serves %s on %s (%s)", self.name, backend.name, backend.device, backend.dtype)

    def teardown(self) -> None:
        if self.runtime is not None and self._owns_runtime:
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
        """A job that ended canceled goes to RQ's canceled registry, not the finished one; a job
        handed back goes to the front of its queue again; a job another worker took over is left
        to that worker."""
        if job._result in (REQUEUED, LOST):
            with self.connection.pipeline() as pipe:
                self.cleanup_execution(job, pipeline=pipe, execution=execution)
                pipe.execute()
            if job._result == REQUEUED:
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
        log.debug("job %s: canceled (RQ registry)", job.id)
