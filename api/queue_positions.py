"""Queue positions for many waiting clients at once.

Every client waiting on a queued job wants its place in the queue about once a second. One
``LRANGE`` per model per interval answers them all, instead of one ``LPOS`` (a scan of the
queue) per client. A job not in the snapshot (newer than it, or past its cap) is looked up
with ``LPOS``.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared import keys


@dataclass(frozen=True)
class _Snapshot:
    taken: float
    places: dict[str, int]


class QueuePositions:
    def __init__(self, connection: aioredis.Redis, max_age: float, cap: int = 10_000) -> None:
        self._redis = connection
        self._max_age = max_age
        self._cap = cap
        self._snapshots: dict[str, _Snapshot] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def exact(self, model: str, job_id: str) -> int | None:
        pos = await self._redis.lpos(keys.rq_queue(model), job_id)
        return pos if isinstance(pos, int) else None

    async def recent(self, model: str, job_id: str) -> int | None:
        """The job's 0-based place in its model's queue, at most ``max_age`` seconds old."""
        snapshot = await self._snapshot(model)
        place = snapshot.places.get(job_id)
        return place if place is not None else await self.exact(model, job_id)

    async def _snapshot(self, model: str) -> _Snapshot:
        snapshot = self._snapshots.get(model)
        if snapshot is not None and time.monotonic() - snapshot.taken < self._max_age:
            return snapshot
        async with self._locks.setdefault(model, asyncio.Lock()):
            snapshot = self._snapshots.get(model)
            if snapshot is None or time.monotonic() - snapshot.taken >= self._max_age:
                ids = await self._redis.lrange(keys.rq_queue(model), 0, self._cap - 1)
                places = {str(job_id): i for i, job_id in enumerate(ids)}
                snapshot = _Snapshot(time.monotonic(), places)
                self._snapshots[model] = snapshot
            return snapshot
