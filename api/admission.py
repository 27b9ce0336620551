"""Admission control and wait estimates, from each model's queue length and drain rate.

A model's *drain rate* is how many of its jobs ended (finished, failed or canceled) per second
over the last ``STREAMQ_DRAIN_WINDOW`` seconds, read off the sorted set workers keep of their
recently ended jobs (``keys.drained``). A front reads it at most once a second per model.
"""

from __future__ import annotations

import math
import time

import redis.asyncio as aioredis

from api.errors import ApiError, too_many_requests
from shared import keys
from shared.settings import Settings

MAX_RETRY_AFTER = 3600


def retry_after(jobs_ahead: int, rate: float, fallback: float) -> int:
    """Whole seconds until ``jobs_ahead`` jobs have left at ``rate`` jobs/s (``fallback``
    seconds when the rate is 0), clamped to [1, 3600]."""
    seconds = jobs_ahead / rate if rate > 0 else fallback
    return max(1, min(MAX_RETRY_AFTER, math.ceil(round(seconds, 6))))


class DrainRates:
    """Each model's drain rate, cached for ``cache_seconds``."""

    def __init__(self, connection: aioredis.Redis, window: float, cache_seconds: float = 1.0) -> None:
        self._redis = connection
        self.window = window
        self._cache_seconds = cache_seconds
        self._cached: dict[str, tuple[float, float]] = {}

    async def rate(self, model: str) -> float:
        """Jobs of ``model`` ended per second over the window (0.0 when none ended in it)."""
        cached = self._cached.get(model)
        if cached is not None and time.monotonic() - cached[0] < self._cache_seconds:
            return cached[1]
        ended = await self._redis.zcount(keys.drained(model), time.time() - self.window, "+inf")
        rate = int(ended) / self.window
        self._cached[model] = (time.monotonic(), rate)
        return rate

    async def estimated_wait(self, model: str, position: int | None, free_slots: int = 0) -> float | None:
        """Seconds until a job at 0-based ``position`` in the queue starts: none while a slot is
        free for it (the first ``free_slots`` queued jobs start as soon as a worker takes them),
        else until the jobs before it have each freed a slot, at the current drain rate:
        (position + 1 - free_slots) / rate. None when the position or the rate is unknown (0)."""
        if position is None:
            return None
        if position < free_slots:
            return 0.0
        rate = await self.rate(model)
        return round((position + 1 - free_slots) / rate, 1) if rate > 0 else None


class Admission:
    """The 429 for a job refused because its model's queue is full (``STREAMQ_MAX_QUEUED``).

    The limit is checked by the script that creates the job, so fronts submitting at the same
    moment never overshoot it."""

    def __init__(self, settings: Settings, rates: DrainRates) -> None:
        self._limit = settings.max_queued
        self._rates = rates

    async def queue_full(self, model: str, queued: int) -> ApiError:
        # Jobs that must leave the queue before this one would fit under the limit.
        ahead = queued - self._limit + 1
        wait = retry_after(ahead, await self._rates.rate(model), self._rates.window)
        return too_many_requests(
            f"the queue of model '{model}' is full ({queued} jobs waiting, at most {self._limit}); "
            f"retry in about {wait} s",
            "queue_full",
            wait,
        )
