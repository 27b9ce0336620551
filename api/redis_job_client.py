"""The production ``JobClient``: jobs in Redis and RQ, read through this process's stream hub.

It opens the front's Redis connections in the app's lifespan (never at import) and puts the
job system's parts behind the boundary: ``JobService`` (submit, view, cancel), ``JobFollower``
(one client's events), ``WorkerDirectory`` (served models, readiness).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import secrets
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from fastapi import Request
from redis import Redis as SyncRedis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.retry import Retry as SyncRetry

from api.auth import Caller
from api.errors import front_stopping
from api.idempotency import Idempotent
from api.job_client import Events
from api.job_service import JobService
from api.job_stream import JobFollower
from api.metrics import FrontMetrics
from api.quotas import KeyQuotas
from api.stream_hub import StreamHub
from api.worker_directory import WorkerDirectory
from shared import keys
from shared.janitor import Janitor
from shared.redis_connect import RedisTarget
from shared.redis_epoch import EpochWatch
from shared.schemas import JobRequest, JobView
from shared.settings import Settings

log = logging.getLogger("streamq.api")

CLIENT_NAME = "streamq-front"  # how the front's connections show in CLIENT LIST


# A command that meets a dropped connection (a restarted Redis, a killed client) is retried on a
# new one instead of failing its request. Only connection errors are retried, a few times with
# short pauses: an unreachable Redis (refused) fails the request within ~0.1 s; a timeout is not
# retried, so a Redis that hangs fails it after one command timeout.
_RETRIES = 3
CANCELS_AT_CLOSE = 2.0  # seconds a closing front waits for its cancels still in flight
_BACKOFF = {"cap": 0.2, "base": 0.02}
_RETRIED = (RedisConnectionError,)  # not TimeoutError (which redis-py's Retry includes by default)


def _async_client(
    target: RedisTarget, size: int, socket_timeout: float, settings: Settings, replica: bool = False
) -> aioredis.Redis:
    """A client on a bounded pool: connections open within the connect timeout, a command takes
    at most ``socket_timeout``, and under load a request queues for a free connection for up to
    the pool timeout (when Redis is down, connections fail at once and free their place)."""
    pool = target.async_pool(
        blocking_timeout=settings.redis_pool_timeout,
        replica=replica,
        max_connections=size,
        socket_timeout=socket_timeout,
        socket_connect_timeout=settings.redis_connect_timeout,
        decode_responses=True,
        client_name=CLIENT_NAME,
        retry=Retry(ExponentialBackoff(**_BACKOFF), retries=_RETRIES, supported_errors=_RETRIED),
        retry_on_error=list(_RETRIED),
    )
    return aioredis.Redis(connection_pool=pool)


def _same(stored: str | bytes | None, owner: str) -> bool:
    """``stored`` is ``owner`` (compared in constant time)."""
    if stored is None:
        return False
    return hmac.compare_digest(stored if isinstance(stored, bytes) else stored.encode(), owner.encode())


HUB_RECONNECT = 10.0  # seconds: with Sentinel, the stream reader reconnects (to a replica in sync)


@dataclass
class RedisJobClient:
    settings: Settings
    redis: aioredis.Redis
    hub_redis: aioredis.Redis
    count_redis: aioredis.Redis
    rq_redis: SyncRedis
    upkeep_redis: SyncRedis  # the janitor's and the epoch watch's (threads)
    janitor: Janitor
    epoch: EpochWatch
    hub: StreamHub
    jobs: JobService
    directory: WorkerDirectory
    metrics: FrontMetrics
    background: set[asyncio.Task[Any]] = field(default_factory=set)  # fire-and-forget work (cancels)

    @classmethod
    async def open(cls, settings: Settings, metrics: FrontMetrics) -> RedisJobClient:
        target = RedisTarget.of(settings)
        timeout = settings.redis_command_timeout
        conn = _async_client(target, settings.redis_max_connections, timeout, settings)
        hub_block_ms = 10_000
        # The stream hub's reader blocks in XREAD: its own connection, with room for the block.
        # With Sentinel it reads from a replica in sync: a client then never sees an event that
        # a failover could lose (the replica promoted has at least what any replica had), so a
        # resume after a failover has no gap and no repeat.
        hub_conn = _async_client(target, 1, hub_block_ms / 1000 + timeout, settings, replica=True)
        # Prompt-count questions wait on BLPOP: their own two connections, never the shared pool's.
        count_conn = _async_client(target, 2, settings.count_timeout + timeout, settings)
        # RQ is synchronous; it runs in worker threads, on its own small pool (bytes, as RQ wants).
        rq_pool = target.sync_pool(
            blocking_timeout=timeout,
            max_connections=2,
            socket_timeout=timeout,
            socket_connect_timeout=settings.redis_connect_timeout,
            client_name=CLIENT_NAME,
            retry=SyncRetry(ExponentialBackoff(**_BACKOFF), retries=_RETRIES, supported_errors=_RETRIED),
            retry_on_error=list(_RETRIED),
        )
        rq_conn = SyncRedis(connection_pool=rq_pool)
        # The janitor runs in fronts too (one at a time across all processes, under its lock), so
        # a dead worker's job is requeued even when no worker is alive; and every front watches
        # for a Redis that lost its data.
        upkeep = target.client(
            socket_timeout=settings.redis_socket_timeout,
            socket_connect_timeout=settings.redis_connect_timeout,
            client_name=CLIENT_NAME,
        )
        janitor = Janitor(upkeep, settings)
        loop = asyncio.get_running_loop()
        directory = WorkerDirectory(conn, settings)
        quotas = KeyQuotas(settings, conn, CLIENT_NAME)
        hub = StreamHub(
            hub_conn,
            conn,
            front_id=secrets.token_hex(8),
            block_ms=hub_block_ms,
            reconnect_every=HUB_RECONNECT if target.managed else None,
        )
        hub.start()

        def data_lost() -> None:
            metrics.redis_data_lost.inc()
            loop.call_soon_threadsafe(hub.check_jobs)

        epoch = EpochWatch(upkeep, settings.redis_epoch_interval, data_lost)
        janitor.start()
        epoch.start()
        metrics.watch_deployment(rq_conn, settings.worker_ttl)
        return cls(
            settings=settings,
            redis=conn,
            hub_redis=hub_conn,
            count_redis=count_conn,
            rq_redis=rq_conn,
            upkeep_redis=upkeep,
            janitor=janitor,
            epoch=epoch,
            hub=hub,
            jobs=JobService(settings, conn, rq_conn, count_conn, directory, quotas, metrics),
            directory=directory,
            metrics=metrics,
        )

    # ----- the JobClient boundary --------------------------------------------------------------
    async def submit(
        self, request: JobRequest, caller: Caller, idempotent: Idempotent | None = None
    ) -> JobView:
        if self.hub.closed is not None:  # no job its request could no longer follow
            raise front_stopping(self.hub.closed)
        return await self.jobs.submit(request, caller, idempotent)

    async def view(self, job_id: str, owner: str, *, brief: bool = False) -> JobView:
        return await self.jobs.get(job_id, owner, brief=brief)

    async def cancel(self, job_id: str, owner: str) -> JobView:
        return await self.jobs.cancel(job_id, owner)

    def follow(self, job: JobView, after: str, request: Request | None) -> Events:
        s = self.settings
        follower = JobFollower(self.jobs, self.hub, job, request, s.ping_interval, s.position_poll_interval)
        return follower.events(after)

    async def resume_point(self, job_id: str, event_id: tuple[int, int]) -> tuple[str | None, bool]:
        return await self.jobs.resume_point(job_id, event_id)

    async def save_response(self, job_id: str, owner: str, record: str) -> None:
        s = self.settings
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(keys.response(job_id), mapping={"owner": owner, "record": record})
        pipe.expire(keys.response(job_id), s.response_record_life())
        await pipe.execute()

    async def load_response(self, job_id: str, owner: str) -> str | None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.response(job_id))
        pipe.pttl(keys.job(job_id))
        pipe.pttl(keys.response(job_id))
        fields, job_ms, record_ms = await pipe.execute()
        if not fields or job_ms == -2 or not _same(fields.get("owner"), owner):
            return None
        if job_ms > record_ms > 0:  # the job outlives its record (a long continued run): keep pace
            await self.redis.pexpire(keys.response(job_id), job_ms)
        return str(fields["record"])

    async def delete_response(self, job_id: str, owner: str) -> bool:
        if not _same(await self.redis.hget(keys.response(job_id), "owner"), owner):
            return False
        return bool(await self.redis.delete(keys.response(job_id)))

    async def served_models(self) -> dict[str, float]:
        return await self.directory.served_since()

    async def readiness(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ready": False, "redis": False, "models": {}}
        try:
            await self.redis.ping()
            body["redis"] = True
            body["ready"], body["models"] = await self.directory.readiness()
        except RedisError as exc:  # the details (addresses) go to the log, not to anyone who asks
            log.warning("readyz: Redis is unreachable: %s", exc)
            body["error"] = "Redis is unreachable"
        return body

    def end_streams(self, reason: str) -> None:
        self.hub.close_streams(reason)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def close(self) -> None:
        # The cancels of jobs whose clients went away (or whose waits the shutdown ended) go out
        # before the connections close, each within a command's timeout and a retry or two.
        if self.background:
            await asyncio.wait(list(self.background), timeout=CANCELS_AT_CLOSE)
        self.metrics.unwatch_deployment()
        self.janitor.request_stop()
        self.epoch.request_stop()
        await asyncio.to_thread(self.janitor.stop)
        await asyncio.to_thread(self.epoch.stop)
        self.upkeep_redis.close()
        self.upkeep_redis.connection_pool.disconnect()
        await self.hub.stop()
        await self.hub_redis.aclose()
        await self.count_redis.aclose()
        await self.redis.aclose()
        await self.jobs.quotas.close()
        self.rq_redis.close()
        self.rq_redis.connection_pool.disconnect()
