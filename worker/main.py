"""``streamq worker``: one worker process serving one model from its RQ queue."""

from __future__ import annotations

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.settings import Settings
from worker.rq_worker import StreamqWorker


def run_worker(settings: Settings, name: str | None = None, burst: bool = False) -> int:
    connection = redis.Redis.from_url(
        settings.redis_url_or_default(),
        socket_timeout=None,  # the worker blocks on its queue; RQ sets its own timeouts
        socket_connect_timeout=settings.redis_socket_timeout,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )
    worker = StreamqWorker(None, connection=connection, settings=settings, name=name)
    worked = worker.work(burst=burst, logging_level="INFO")
    return 0 if worked or not burst else 1
