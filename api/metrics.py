"""The front's Prometheus metrics, served on ``GET /metrics`` (open, like the health probes).

Each app gets its own ``CollectorRegistry`` (``FrontMetrics``), held on ``app.state``; no
module-level registry. The front is stateless, so what describes the deployment (queue
depths, live workers, running jobs) is read from Redis at scrape time by a custom collector,
and any front gives the same answer. What happened in this front (jobs submitted, cancels,
Redis errors) is counted here; sum it over the fronts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

import anyio.to_thread
import redis
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from api.errors import ApiError
from shared import queue_stats

log = logging.getLogger("streamq.api")
T = TypeVar("T")

# Buckets (seconds) for what a person waits on: from a few ms to several minutes.
WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class DeploymentCollector(Collector):
    """Queue depth and oldest wait per model, live workers and their slots, running jobs: read
    from Redis when Prometheus scrapes (a failed read leaves them out and counts a Redis error).
    ``streamq_redis_up`` says whether the read worked: an alert on a gauge that went missing
    stays silent, one on this gauge does not."""

    def __init__(self, connection: redis.Redis, worker_ttl: float, redis_errors: Counter) -> None:
        self._redis = connection
        self._worker_ttl = worker_ttl
        self._redis_errors = redis_errors

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            workers = [w for w in queue_stats.workers(self._redis, self._worker_ttl) if w.live]
            models = queue_stats.known_models(self._redis, workers)
            queues = queue_stats.queues(self._redis, models)
            running = queue_stats.running_jobs(self._redis)
        except redis.RedisError as exc:
            log.warning("metrics: could not read the queues from Redis: %s", exc)
            self._redis_errors.inc()
            yield self._redis_up(0)
            return
        yield self._redis_up(1)
        depth = GaugeMetricFamily(
            "streamq_queue_depth", "Jobs waiting in the model's queue", labels=["model"]
        )
        oldest = GaugeMetricFamily(
            "streamq_queue_oldest_wait_seconds",
            "How long the job at the head of the model's queue has waited (0: empty queue)",
            labels=["model"],
        )
        for q in queues:
            depth.add_metric([q.model], q.depth)
            oldest.add_metric([q.model], q.oldest_wait or 0.0)
        live = GaugeMetricFamily(
            "streamq_workers", "Live worker processes serving the model", labels=["model"]
        )
        slots = GaugeMetricFamily("streamq_slots", "Job slots of the model's live workers", labels=["model"])
        busy = GaugeMetricFamily("streamq_slots_busy", "Slots running a job now", labels=["model"])
        for model in models:
            serving = [w for w in workers if w.model == model]
            live.add_metric([model], len(serving))
            slots.add_metric([model], sum(w.slots for w in serving))
            busy.add_metric([model], sum(w.busy for w in serving))
        yield from (depth, oldest, live, slots, busy)
        yield GaugeMetricFamily("streamq_jobs_running", "Jobs running now on any worker", value=running)

    @staticmethod
    def _redis_up(up: int) -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "streamq_redis_up", "1 when this scrape could read the deployment from Redis, else 0", value=up
        )


class FrontMetrics:
    """This front's own counters, and the deployment collector, on one registry.

    A front of several processes (``streamq api --workers N``) gives ``multiprocess_dir``, where
    prometheus_client keeps every process's counters (its ``PROMETHEUS_MULTIPROC_DIR``): each
    scrape, whichever process answers it, then sums them all."""

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        # The process's own (memory, CPU, open files, start time: restarts and OOMs show), as
        # prometheus_client's default registry has them; a front of several processes sums
        # its counters from files instead, where these would be one process's only.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._multiprocess_dir = multiprocess_dir
        self._deployment: DeploymentCollector | None = None
        self._scrape_lock: asyncio.Lock | None = None  # made in the event loop, at the first scrape
        self._connection: redis.Redis | None = None
        self._worker_ttl = 0.0
        self.jobs_submitted = Counter(
            "streamq_jobs_submitted", "Jobs this front queued", ["model"], registry=self.registry
        )
        self.jobs_unreplicated = Counter(
            "streamq_jobs_unreplicated",
            "Jobs this front refused (503 replica_unavailable): no replica held them in time",
            registry=self.registry,
        )
        self.cancel_latency = Histogram(
            "streamq_cancel_latency_seconds",
            "Cancel call to the job's canceled state (state: where the job was when asked)",
            ["state"],
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )
        self.api_errors = Counter(
            "streamq_api_errors",
            "Error answers of this front, by HTTP status and the error envelope's code",
            ["status", "code"],
            registry=self.registry,
        )
        self.redis_errors = Counter(
            "streamq_redis_errors", "Redis commands that failed", ["component"], registry=self.registry
        ).labels("front")
        self.redis_data_lost = Counter(
            "streamq_redis_data_lost",
            "Times this front found that Redis had lost its data",
            registry=self.registry,
        )

    def watch_deployment(self, connection: redis.Redis, worker_ttl: float) -> None:
        """Add the scrape-time collector, reading through ``connection`` (a synchronous client)."""
        self.unwatch_deployment()
        self._connection, self._worker_ttl = connection, worker_ttl
        self._deployment = DeploymentCollector(connection, worker_ttl, self.redis_errors)
        self.registry.register(self._deployment)

    def unwatch_deployment(self) -> None:
        if self._deployment is not None:
            self.registry.unregister(self._deployment)
            self._deployment = None

    def exposition(self) -> bytes:
        if self._multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=self._multiprocess_dir)
        if self._deployment is not None:
            registry.register(self._deployment)
        return generate_latest(registry)

    def model_load(self, model: str, configured: list[str]) -> dict[str, int | str] | None:
        """What an autoscaler needs of one model: jobs waiting, jobs running on its live workers
        (as of their last heartbeat), their slots, and load = waiting + running. None for a
        model not in ``configured`` (STREAMQ_MODELS) that no live worker serves and no queue
        has held: a misspelt name in the autoscaler's configuration, which zeros would hide."""
        assert self._connection is not None, "watch_deployment() first"
        live = [w for w in queue_stats.workers(self._connection, self._worker_ttl) if w.live]
        if model not in configured and model not in queue_stats.known_models(self._connection, live):
            return None
        serving = [w for w in live if w.model == model]
        (queue,) = queue_stats.queues(self._connection, [model])
        running = sum(w.busy for w in serving)
        return {
            "model": model,
            "queued": queue.depth,
            "running": running,
            "slots": sum(w.slots for w in serving),
            "load": queue.depth + running,
        }

    async def in_turn(self, read: Callable[[], T]) -> T:
        """Run a synchronous Redis read on a worker thread, one at a time (see ``scrape``)."""
        if self._scrape_lock is None:
            self._scrape_lock = asyncio.Lock()
        async with self._scrape_lock:
            return await anyio.to_thread.run_sync(read)

    async def scrape(self) -> bytes:
        """The exposition, made by one thread at a time (reading the queues is synchronous Redis
        I/O): a flood of scrapes waits its turn here, holding one worker thread and one Redis
        connection, never the threads and connections job submits need."""
        return await self.in_turn(self.exposition)


router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus text format."""
    front_metrics: FrontMetrics = request.app.state.metrics
    return Response(await front_metrics.scrape(), media_type=CONTENT_TYPE_LATEST)


@router.get("/scaling", include_in_schema=False)
async def scaling(request: Request, model: str) -> dict[str, int | str]:
    """One model's load for an autoscaler (KEDA's metrics-api trigger): ``load`` = jobs waiting +
    jobs running. Open, like /metrics; it tells no more than /metrics does."""
    front_metrics: FrontMetrics = request.app.state.metrics
    configured = request.app.state.jobs.settings.model_list()
    load = await front_metrics.in_turn(lambda: front_metrics.model_load(model, configured))
    if load is None:
        raise ApiError(
            404,
            f"no model '{model}': no live worker serves it, no queue has held it, and it is not in "
            "STREAMQ_MODELS (check the autoscaler's model name)",
            param="model",
            code="model_not_found",
        )
    return load
