"""Which workers are alive and which models they serve, read from their heartbeats."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import cast

import redis.asyncio as aioredis

from api.errors import ApiError
from shared import keys
from shared.settings import Settings


@dataclass(frozen=True)
class WorkerInfo:
    name: str
    model: str
    device: str
    last_heartbeat: float
    current_job: str
    context_length: int | None
    started_at: float
    engine: str = ""
    features: frozenset[str] = frozenset()
    vocab_size: int | None = None  # the token ids its engine takes (0 to vocab_size - 1)
    slots: int = 0  # jobs it runs at once (0: it did not say)
    draining: bool = False  # stopping: it takes no new job

    @property
    def free_slots(self) -> int:
        """Slots free at its last heartbeat: its slots less the jobs it named as running."""
        running = len([job for job in self.current_job.split(",") if job])
        return 0 if self.draining else max(0, self.slots - running)


class WorkerDirectory:
    def __init__(self, connection: aioredis.Redis, settings: Settings, cache_seconds: float = 1.0) -> None:
        self._redis = connection
        self._ttl = settings.worker_ttl
        self._expected = settings.model_list()
        self._scale_to_zero = settings.scale_to_zero
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, list[WorkerInfo]] | None = None

    async def live_workers(self) -> list[WorkerInfo]:
        now = time.time()
        names = cast(list[str], await self._redis.zrangebyscore(keys.WORKERS, now - self._ttl, "+inf"))
        if not names:
            return []
        pipe = self._redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.worker(name))
        infos = await pipe.execute()
        workers = [
            WorkerInfo(
                name=name,
                model=info.get("model", ""),
                device=info.get("device", ""),
                last_heartbeat=float(info.get("last_heartbeat") or 0),
                current_job=info.get("current_job", ""),
                context_length=int(info["context_length"]) if info.get("context_length") else None,
                started_at=float(info.get("started_at") or 0),
                engine=info.get("engine", ""),
                features=frozenset(f for f in info.get("features", "").split(",") if f),
                vocab_size=int(info["vocab_size"]) if info.get("vocab_size") else None,
                slots=int(info.get("slots") or 0),
                draining=bool(info.get("draining")),
            )
            for name, info in zip(names, infos, strict=True)
            if info
        ]
        self._cached = (time.monotonic(), workers)
        return workers

    async def _workers(self, fresh: bool = False) -> list[WorkerInfo]:
        if not fresh and self._cached and time.monotonic() - self._cached[0] < self._cache_seconds:
            return self._cached[1]
        return await self.live_workers()

    async def served_models(self, fresh: bool = False) -> dict[str, int]:
        """Model name → number of live workers serving it."""
        counts: dict[str, int] = {}
        for w in await self._workers(fresh):
            counts[w.model] = counts.get(w.model, 0) + 1
        return counts

    async def served_since(self) -> dict[str, float]:
        """Model name → when the longest-running of its live workers started (fresh, unix seconds)."""
        since: dict[str, float] = {}
        for w in await self._workers(fresh=True):
            since[w.model] = min(since.get(w.model, w.started_at), w.started_at)
        return since

    async def context_length(self, model: str) -> int | None:
        """The smallest context of the model's live workers (None if none says)."""
        known = [w.context_length for w in await self._workers() if w.model == model and w.context_length]
        return min(known) if known else None

    async def free_slots(self, model: str) -> int:
        """Slots of the model's live workers that were free at their last heartbeats."""
        return sum(w.free_slots for w in await self._workers() if w.model == model)

    async def vocab_size(self, model: str) -> int | None:
        """The token ids every live worker of the model takes: 0 to this - 1 (None if none says)."""
        known = [w.vocab_size for w in await self._workers() if w.model == model and w.vocab_size]
        return min(known) if known else None

    async def missing_feature(self, model: str, needed: dict[str, str]) -> ApiError | None:
        """A 400 naming the first field of ``needed`` (feature → field) that some live worker of
        the model cannot do (any worker may take the job); None when all can, or none is live."""
        workers = [w for w in await self._workers() if w.model == model]
        for feature, field_name in needed.items():
            lacking = sorted({w.engine or "older" for w in workers if feature not in w.features})
            if lacking:
                return ApiError(
                    400,
                    f"'{field_name}' is not supported by the {' and '.join(lacking)} engine serving "
                    f"'{model}' (the transformers and vLLM engines offer it; models served through "
                    "their own stream_chat do not)",
                    param=field_name,
                    code="unsupported_parameter",
                )
        return None

    async def readiness(self) -> tuple[bool, dict[str, int]]:
        """Ready when every expected model (STREAMQ_MODELS) has a live worker, and some worker is
        live; with STREAMQ_SCALE_TO_ZERO, whatever the workers (they come when jobs wait)."""
        models = await self.served_models(fresh=True)
        expected = {m: models.get(m, 0) for m in self._expected}
        ready = self._scale_to_zero or (bool(models) and all(expected.values()))
        return ready, {**models, **expected}

    async def known(self, model: str) -> bool:
        """A model this deployment serves or has served: listed in STREAMQ_MODELS, or RQ has
        seen its queue (a job was queued for it once)."""
        if model in self._expected:
            return True
        return bool(await self._redis.sismember(keys.RQ_QUEUES, keys.rq_queue(model)))

    async def resolve(self, requested: str | None) -> str:
        """The model a job goes to, or the ApiError that explains why none fits: 404 for a model
        never seen, 503 (with Retry-After) for a known one that has no live worker right now, or
        any while no worker is live and STREAMQ_MODELS does not say which models exist."""
        models = await self.served_models()
        if requested and requested not in models:
            models = await self.served_models(fresh=True)
        names = ", ".join(sorted(models)) or "none"
        retry = {"Retry-After": str(math.ceil(self._ttl))}  # a new worker is live within its ttl
        if requested:
            if requested in models or (self._scale_to_zero and requested in self._expected):
                return requested  # scale to zero: the job waits in its queue for a worker to start
            # No live worker at all, and no list of the models to expect: an outage (Redis
            # restarted empty: its workers re-announce within seconds, and RQ's list of queues is
            # gone) rather than a wrong name. With STREAMQ_MODELS, a name not in it stays a 404.
            outage = not models and not self._expected
            if outage or await self.known(requested):
                raise ApiError(
                    503,
                    f"model '{requested}' has no live worker right now; try again shortly",
                    param="model",
                    code="model_unavailable",
                    headers=retry,
                )
            raise ApiError(
                404,
                f"model '{requested}' is not served by any live worker (served: {names})",
                param="model",
                code="model_not_found",
            )
        if len(models) == 1:
            return next(iter(models))
        if not models and self._scale_to_zero and len(self._expected) == 1:
            return self._expected[0]
        if not models:
            raise ApiError(503, "no worker is serving a model yet; try again shortly", headers=retry)
        raise ApiError(400, f"several models are served ({names}): name one in 'model'", param="model")
