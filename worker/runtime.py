"""A worker process's runtime, built in one place from its ``Settings``: the loaded model, its
engine, the threads that serve it (publisher, cancel watcher, leases, heartbeat, prompt
counter, janitor, metrics) and the job runner that puts jobs on the engine.

``build_runtime`` makes one. Its owner (the slot pool, or a StreamqWorker started the plain RQ
way) starts and stops it and hands it to what takes its jobs (the pool's dispatcher, or that RQ
worker); a job reaches it through them, never through a process-wide instance.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import redis

from shared.janitor import Janitor
from shared.redis_epoch import EpochWatch
from shared.settings import Settings
from worker.backend import ServedModel
from worker.cancel_watcher import CancelWatcher
from worker.engine import BatchModel, Engine
from worker.heartbeat import Heartbeat
from worker.job_runner import JobFailed, JobRunner, Outcome
from worker.leases import LeaseKeeper
from worker.metrics import WorkerMetrics
from worker.model_loading import (
    check_model_folder,
    configure_threads,
    default_served_name,
    load_backend,
    resolve_device,
)
from worker.prompt_counter import PromptCounter
from worker.step_publisher import StepPublisher

log = logging.getLogger("streamq.worker")


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
    check_model_folder(settings.model)
    from worker.engine_choice import choose_engine

    device = resolve_device(settings.device)
    engine = choose_engine(settings, device)
    log.info("engine: %s (STREAMQ_ENGINE=%s)", engine, settings.engine)
    if engine == "transformers" and settings.tensor_parallel_size * settings.pipeline_parallel_size > 1:
        split = (
            "STREAMQ_TENSOR_PARALLEL_SIZE and STREAMQ_PIPELINE_PARALLEL_SIZE split a model over GPUs "
            "on the vLLM engine (--engine vllm) only: the transformers engine runs on one device"
        )
        if settings.engine == "transformers":
            raise ValueError(split)
        log.warning("%s (the one chosen for this model): they are not used", split)
    if engine == "vllm":
        from worker.vllm_setup import load_vllm_served

        return load_vllm_served(settings, served, device)
    configure_threads(device, settings.torch_threads)
    return load_backend(settings.model, settings.device, settings.dtype, served, settings.trust_remote_code)


def build_runtime(settings: Settings, connection: redis.Redis, worker_name: str) -> WorkerRuntime:
    """Load the model, build (and warm up) its engine model, and everything that serves it."""
    from worker.engine_setup import build_model

    backend = load_worker_backend(settings, served_name_of(settings))
    model, max_len = build_model(settings, backend)
    return WorkerRuntime(settings, connection, worker_name, backend, model, max_len)


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
        self.served_name = backend.name
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
                "vocab_size": str(getattr(model, "vocab_size", None) or ""),
            },
        )
        self.counter = PromptCounter(connection, backend, context_length)
        self.leases = LeaseKeeper(connection, settings)
        self.janitor = Janitor(connection, settings)
        self.epoch = EpochWatch(connection, settings.redis_epoch_interval, self._data_lost)
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
        self._running: dict[str, str] = {}  # slot name → the job it runs (a job may run twice)
        self._lock = threading.Lock()
        # Called (in the epoch watch's or the heartbeat's thread) when Redis forgot this worker
        # (it came back empty, or a janitor took the worker for dead after a pause): the RQ
        # worker that takes this process's jobs enters RQ's lists again.
        self.on_forgotten: list[Callable[[], None]] = []
        self.heartbeat.on_forgotten = self._announce_again

    def _data_lost(self) -> None:
        """Redis came back empty: count it, and announce this worker again at once (the fronts
        see no live worker until its next heartbeat; `rq info`, none until it restarted)."""
        self.metrics.redis_data_lost.inc()
        self._announce_again(self.heartbeat.beat)

    def _announce_again(self, *first: Callable[[], object]) -> None:
        for announce in (*first, *self.on_forgotten):  # each, whatever the others do
            try:
                announce()
            except Exception as exc:
                log.warning(
                    "announcing this worker again, %s failed: %s",
                    getattr(announce, "__name__", announce),
                    exc,
                )

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
        self.epoch.start()

    def stop(self) -> None:
        """Stop the engine (jobs it still holds go back to their queue), write what is left, leave
        the worker list."""
        helpers = (self.janitor, self.epoch, self.counter, self.cancels)
        for helper in helpers:
            helper.request_stop()
        self.engine.stop()
        self.publisher.stop()
        self.leases.stop()
        self.heartbeat.stop()
        for helper in helpers:
            helper.stop()
        self.metrics.close()

    def run_job(self, job_id: str, slot_name: str, fields: dict[str, str] | None = None) -> Outcome:
        """Run one job on the engine (from the job thread the dispatcher gave it); JobFailed if it failed."""
        with self._lock:
            self._running[slot_name] = job_id
            self.heartbeat.current_job = ",".join(self._running.values())
        status = "failed"  # JobFailed, or anything else the run raised
        try:
            outcome = self.runner.run(job_id, slot_name, fields)
            status = outcome.value
            return outcome
        except JobFailed as failed:
            self.metrics.job_failed(failed.error_type or "unknown")
            raise
        except Exception:
            self.metrics.job_failed("worker_error")
            raise
        finally:
            self.metrics.job_ended(status)
            with self._lock:
                self._running.pop(slot_name, None)
                self.heartbeat.current_job = ",".join(self._running.values())
                self.heartbeat.jobs_done += 1
