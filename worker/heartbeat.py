"""Announces a live worker: which model it serves, on what device, what it is running.

The front reads this to route jobs, answer /readyz and list models; an entry older than
``worker_ttl`` seconds is treated as gone (a killed worker drops out by itself).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis

from shared import keys
from shared.background import BackgroundThread
from shared.settings import Settings

log = logging.getLogger("streamq.worker")


class Heartbeat(BackgroundThread):
    thread_name = "streamq-heartbeat"

    def __init__(
        self, connection: redis.Redis, settings: Settings, worker_name: str, info: dict[str, str]
    ) -> None:
        super().__init__()
        self._redis = connection
        self._interval = settings.heartbeat_interval
        self._ttl = settings.worker_ttl
        self.worker_name = worker_name
        self._info = {
            **info,
            "pid": str(os.getpid()),
            "host": socket.gethostname(),
            "started_at": str(time.time()),
        }
        self.current_job = ""
        self.jobs_done = 0
        # Called (in a thread of its own) when a beat finds this worker gone from the registry: a janitor
        # took it for dead (a pause past STREAMQ_WORKER_TTL), or Redis lost its data.
        self.on_forgotten: Callable[[], None] | None = None

    def publish(self, **info: str) -> None:
        """Add fields to what the worker announces (from its next beat on)."""
        self._info.update(info)

    def start(self) -> None:
        self.beat()
        super().start()

    def stop(self) -> None:
        super().stop()
        try:
            pipe = self._redis.pipeline(transaction=True)
            pipe.zrem(keys.WORKERS, self.worker_name)
            pipe.delete(keys.worker(self.worker_name))
            pipe.execute()
        except redis.RedisError as exc:
            log.warning("could not remove worker %s from the registry: %s", self.worker_name, exc)

    def beat(self) -> bool:
        """Write this worker's record and its place in the registry; True when that place was
        gone (a janitor, or an empty Redis, had dropped it)."""
        now = time.time()
        pipe = self._redis.pipeline(transaction=True)
        fields: dict[Any, Any] = {
            **self._info,
            "last_heartbeat": str(now),
            "current_job": self.current_job,
            "jobs_done": str(self.jobs_done),
        }
        pipe.hset(keys.worker(self.worker_name), mapping=fields)
        pipe.expire(keys.worker(self.worker_name), int(self._ttl * 3) + 1)
        pipe.zadd(keys.WORKERS, {self.worker_name: now})
        return bool(pipe.execute()[-1])

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                if self.beat() and self.on_forgotten is not None and not self._stop.is_set():
                    log.warning(
                        "worker %s was dropped from the registry: announcing it again", self.worker_name
                    )
                    # In a thread of its own: announcing may retry for a while, and the beats go on.
                    threading.Thread(target=self.on_forgotten, name="streamq-reannounce", daemon=True).start()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
            except Exception:  # a bug must not end the beats (the worker would look dead)
                log.exception("heartbeat failed")
