"""Per-key quotas, held in Redis so that they bind across front replicas.

- Requests: at most ``STREAMQ_KEY_RATE_LIMIT`` job requests per key (e.g. ``120/minute``), in a
  moving window (the ``limits`` library's Redis storage).
- Concurrency: at most ``STREAMQ_KEY_MAX_CONCURRENT`` jobs of one key queued or running. A sorted
  set per key holds its admitted jobs; the script that creates a job checks its size and adds
  to it in the same step. Ended jobs are pruned from it when it is full, by reading their status, so
  no job end (worker, janitor, cancel, expiry) has to remember the quota.

Over either: 429 ``rate_limit_error`` with ``Retry-After``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import redis.asyncio as aioredis
from limits import RateLimitItem, parse_many
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError
from redis.exceptions import RedisError

from api.auth import OPEN
from api.errors import ApiError, too_many_requests
from shared import keys
from shared.job_store import scripts
from shared.job_store.vocabulary import FINAL_STATUSES, JobField
from shared.redis_connect import RedisTarget
from shared.settings import Settings


def said(rate: RateLimitItem) -> str:
    """A rate as a person says it: '120 per minute', '6 per 20 seconds'."""
    unit = rate.GRANULARITY.name
    return f"{rate.amount} per {unit if rate.multiples == 1 else f'{rate.multiples} {unit}s'}"


def parse_rate_limit(text: str) -> RateLimitItem | None:
    """``STREAMQ_KEY_RATE_LIMIT`` as a limit (None: no limit: empty, ``0``, or none per a window,
    which the library would take as "refuse every request"); ValueError when unreadable."""
    if text.strip() in ("", "0"):
        return None
    try:
        (rate,) = parse_many(text)  # one rate: "0/second;5/minute" read as its first was no limit
    except ValueError:
        raise ValueError(
            f"STREAMQ_KEY_RATE_LIMIT {text!r} is not one rate such as '120/minute' or '5 per 10 seconds'"
        ) from None
    return rate if rate.amount > 0 else None


class KeyQuotas:
    def __init__(self, settings: Settings, connection: aioredis.Redis, client_name: str) -> None:
        self._redis = connection
        self._max_concurrent = settings.key_max_concurrent
        self._rate = parse_rate_limit(settings.key_rate_limit)
        self._set_life = settings.records_life()
        # Its own pool, as large as the shared one (the library wants bytes replies; the shared
        # pool decodes): every keyed request takes one of its connections for one round trip,
        # and a small pool made them queue. Opened as needed: none while the front has no keys.
        target = RedisTarget.of(settings)
        url = settings.redis_url_or_default()
        if target.managed:  # the library wants an address in its URI; the pool decides the real one
            host, port = target.sentinels[0]
            url = f"redis://[{host}]:{port}/0" if ":" in host else f"redis://{host}:{port}/0"
        self._pool = target.async_pool(
            blocking_timeout=settings.redis_pool_timeout,
            max_connections=settings.redis_max_connections,
            client_name=client_name,
            socket_timeout=settings.redis_command_timeout,
            socket_connect_timeout=settings.redis_connect_timeout,
        )
        self._storage = RedisStorage(
            "async+" + (url.replace("unix://", "redis+unix://", 1) if url.startswith("unix://") else url),
            implementation="redispy",
            key_prefix=keys.RATE_LIMIT_PREFIX,
            wrap_exceptions=True,
            connection_pool=self._pool,  # type: ignore[arg-type]  # passed on to redis-py
        )
        self._limiter = MovingWindowRateLimiter(self._storage)

    async def hit(self, name: str) -> None:
        """Count one job request of the key; 429 when it is over its rate. (No key, no quota.)"""
        if self._rate is None or name == OPEN:
            return
        try:
            if await self._limiter.hit(self._rate, name):
                return
            stats = await self._limiter.get_window_stats(self._rate, name)
        except StorageError as exc:
            raise RedisError(f"rate limit storage: {exc}") from exc
        retry = max(1, math.ceil(stats.reset_time - time.time()))
        raise too_many_requests(
            f"this API key is over its request rate ({said(self._rate)}, STREAMQ_KEY_RATE_LIMIT); "
            f"retry in {retry} s",
            "rate_limit_exceeded",
            retry,
        )

    def quota(self, name: str) -> scripts.Quota | None:
        """The key's concurrency quota, which the script creating its job checks (None: none)."""
        if self._max_concurrent == 0 or name == OPEN:
            return None
        return scripts.Quota(name, self._max_concurrent, int(self._set_life))

    def over_concurrency(self) -> ApiError:
        return too_many_requests(
            f"this API key has {self._max_concurrent} jobs queued or running, its most at once "
            "(STREAMQ_KEY_MAX_CONCURRENT); retry when one has ended",
            "concurrency_limit_exceeded",
            1,
        )

    async def prune(self, name: str) -> bool:
        """Forget the key's jobs that have ended; whether there were any."""
        active = keys.key_active(name)
        found: list[Any] = await self._redis.zrange(active, 0, -1, withscores=True)
        members = [(str(job_id), float(score)) for job_id, score in found]
        if not members:
            return False
        pipe = self._redis.pipeline(transaction=False)
        for job_id, _ in members:
            pipe.hget(keys.job(job_id), JobField.STATUS)
        statuses = await pipe.execute()
        # A job is admitted and created in one step: no hash means it expired.
        ended = [
            job_id
            for (job_id, _), status in zip(members, statuses, strict=True)
            if status is None or status in FINAL_STATUSES
        ]
        if ended:
            await self._redis.zrem(active, *ended)
        return bool(ended)

    async def close(self) -> None:
        await self._pool.disconnect()
