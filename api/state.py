"""The front's per-process clients, opened in the app's lifespan (never at import)."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request
from redis import BlockingConnectionPool as SyncBlockingPool
from redis import Redis as SyncRedis

from api.job_service import JobService
from api.stream_hub import StreamHub
from api.worker_directory import WorkerDirectory
from shared.settings import Settings

CLIENT_NAME = "streamq-front"  # how the front's connections show in CLIENT LIST


@dataclass
class Front:
    settings: Settings
    redis: aioredis.Redis
    hub_redis: aioredis.Redis
    rq_redis: SyncRedis
    hub: StreamHub
    jobs: JobService
    directory: WorkerDirectory
    background: set[asyncio.Task[Any]] = field(default_factory=set)  # fire-and-forget work (cancels)

    @classmethod
    async def open(cls, settings: Settings) -> Front:
        url = settings.redis_url_or_default()
        timeout = settings.redis_socket_timeout
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=settings.redis_max_connections,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            client_name=CLIENT_NAME,
        )
        conn = aioredis.Redis(connection_pool=pool)
        hub_block_ms = 10_000
        hub_conn = aioredis.Redis.from_url(
            url,
            max_connections=1,
            socket_timeout=hub_block_ms / 1000 + timeout,
            socket_connect_timeout=timeout,
            decode_responses=True,
            client_name=CLIENT_NAME,
        )
        # RQ is synchronous; it runs in worker threads, on its own small pool (bytes, as RQ wants).
        rq_pool = SyncBlockingPool.from_url(
            url,
            max_connections=2,
            timeout=timeout,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            client_name=CLIENT_NAME,
        )
        rq_conn = SyncRedis(connection_pool=rq_pool)
        directory = WorkerDirectory(conn, settings)
        hub = StreamHub(hub_conn, conn, front_id=secrets.token_hex(8), block_ms=hub_block_ms)
        hub.start()
        return cls(
            settings=settings,
            redis=conn,
            hub_redis=hub_conn,
            rq_redis=rq_conn,
            hub=hub,
            jobs=JobService(settings, conn, rq_conn, directory),
            directory=directory,
        )

    async def close(self) -> None:
        await self.hub.stop()
        await self.hub_redis.aclose()
        await self.redis.aclose()
        self.rq_redis.close()
        self.rq_redis.connection_pool.disconnect()


def get_front(request: Request) -> Front:
    front: Front = request.app.state.front
    return front
