"""A worker process's Prometheus metrics, on a small HTTP port of its own.

One ``CollectorRegistry`` per worker process (``WorkerMetrics``), shared by its engine, its
publisher and its job threads (prometheus-client's metrics are thread-safe). The engine's
hot path does a fixed, small amount of metric work per step, never per token per label: the
children for this process's model are bound once, here; tokens are added once per batch of
outputs; a job's latencies are observed once per job.

``STREAMQ_METRICS_PORT`` is the first port tried; when it is taken (several workers on one
host, e.g. ``streamq up --workers 2``) the next free one is used. The port a worker got is in
its heartbeat record, so ``streamq status`` lists it.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("streamq.worker")
_TYPE = re.compile(r"[a-z][a-z0-9_]{0,47}")  # an error type as a label: streamq's short names

PORTS_TRIED = 32  # STREAMQ_METRICS_PORT, then the next ones, until one is free
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class SlotCollector(Collector):
    """Running jobs and free slots of this process, read when Prometheus scrapes."""

    def __init__(self, model: str, slots: int, running: Callable[[], int]) -> None:
        self._model = model
        self._slots = slots
        self._running = running

    def collect(self) -> Iterator[GaugeMetricFamily]:
        running = self._running()
        for name, doc, value in (
            ("streamq_worker_jobs_running", "Jobs this worker process runs now", running),
            ("streamq_worker_slots", "Job slots of this worker process", self._slots),
            ("streamq_worker_slots_free", "Slots free to take a job", max(0, self._slots - running)),
        ):
            family = GaugeMetricFamily(name, doc, labels=["model"])
            family.add_metric([self._model], value)
            yield family


class WorkerMetrics:
    def __init__(self, model: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        # The process's own (memory, CPU, open files, start time: restarts and OOMs show).
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.model = model
        r = self.registry
        self._jobs = Counter(
            "streamq_jobs",
            "Jobs this worker ended, by status (finished, failed, canceled; requeued: handed back)",
            ["model", "status"],
            registry=r,
        )
        self._failed = Counter(
            "streamq_jobs_failed",
            "Jobs this worker ended failed, by error type (invalid_request_error: the request's fault)",
            ["model", "type"],
            registry=r,
        )
        # Every status's series from the start (at 0): increase() over a series that appears
        # with its first job misses that job.
        for status in ("finished", "failed", "canceled", "requeued", "lost", "missing"):
            self._jobs.labels(model, status)
        self.queue_wait = Histogram(
            "streamq_queue_wait_seconds",
            "Job created to started on a worker (first run of a job)",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=r,
        ).labels(model)
        self.time_to_first_token = Histogram(
            "streamq_time_to_first_token_seconds",
            "Job started on a worker to its first text",
            ["model"],
            buckets=WAIT_BUCKETS,
            registry=r,
        ).labels(model)
        self.inter_token_latency = Histogram(
            "streamq_inter_token_latency_seconds",
            "Per job: (end - first token) / (tokens - 1), for jobs of two tokens or more",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        ).labels(model)
        self.engine_step = Histogram(
            "streamq_engine_step_seconds",
            "One engine step (a token for every running job)",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        ).labels(model)
        self.generated_tokens = Counter(
            "streamq_generated_tokens", "Tokens generated", ["model"], registry=r
        ).labels(model)
        self.redis_errors = Counter(
            "streamq_redis_errors", "Redis commands that failed", ["component"], registry=r
        ).labels("worker")
        self.redis_data_lost = Counter(
            "streamq_redis_data_lost", "Times this process found that Redis had lost its data", registry=r
        )
        self._info = Info("streamq_worker", "This worker process", registry=r)
        self._server: Any = None
        self._lock = threading.Lock()

    def job_ended(self, status: str) -> None:
        self._jobs.labels(self.model, status).inc()

    def job_failed(self, error_type: str) -> None:
        """One of the failed jobs, by its error's type (a short name of streamq's, else "other")."""
        self._failed.labels(self.model, error_type if _TYPE.fullmatch(error_type) else "other").inc()

    def describe_worker(self, **info: str) -> None:
        self._info.info(info)

    def watch_slots(self, slots: int, running: Callable[[], int]) -> None:
        self.registry.register(SlotCollector(self.model, slots, running))

    def serve(self, host: str, port: int) -> int | None:
        """Serve /metrics on ``port`` or the next free one; returns the port (None: 0 = off, or
        no free port)."""
        if not port:
            return None
        for candidate in range(port, min(port + PORTS_TRIED, 65536)):
            try:
                server, _thread = start_http_server(candidate, addr=host, registry=self.registry)
            except OSError:
                continue
            with self._lock:
                self._server = server
            if candidate != port:
                log.info("metrics: port %d is taken; serving /metrics on %d", port, candidate)
            return candidate
        log.warning("metrics: no free port in %d-%d; this worker serves no /metrics", port, candidate)
        return None

    def close(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
