"""Noticing a Redis that lost its data.

A Redis that restarts with no persistence, or a failover to a replica that never synced, comes
back *empty*: every job, queue and stream is gone, yet every command succeeds. To notice, the
first process writes a random *epoch* into ``streamq:epoch`` (no TTL, written with SET NX) and
every process (fronts and workers) reads it every ``redis_epoch_interval`` seconds. Gone, or
another value than the one it saw: Redis lost its data. The process logs it loudly, counts it in
its metrics (``streamq_redis_data_lost``) and calls its handler; it then writes a new epoch (or
adopts the one another process wrote first), so the loss is reported once per process.

What follows a loss is the same everywhere: a running job whose record is gone stops at its next
lease renewal; a client following a job that is gone gets a final ``error`` event of type
``job_lost`` (the front checks that the job still exists at every keep-alive, and at once on a
loss); new jobs work as before.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable

import redis

from shared import keys
from shared.background import BackgroundThread
from shared.redis_text import text

log = logging.getLogger("streamq")

LOST = (
    "Redis lost its data (it restarted empty, or failed over to a replica without it): every job "
    "that was queued or running is gone; clients following one get an error; new jobs work"
)


class RedisEpoch:
    """The epoch this process has seen, and the check that compares it with Redis's."""

    def __init__(self, connection: redis.Redis) -> None:
        self._redis = connection
        self.seen: str | None = None

    def check(self) -> bool:
        """Read (or write) the epoch; True when Redis lost its data since the last check."""
        fresh = secrets.token_hex(8)
        # SET NX GET: writes ours if there is none, and answers what was there (nil if none).
        before = text(self._redis.set(keys.EPOCH, fresh, nx=True, get=True))
        now = before if before is not None else fresh
        lost = self.seen is not None and now != self.seen
        self.seen = now
        return lost


class EpochWatch(BackgroundThread):
    """Checks the epoch every ``interval`` seconds; ``on_lost`` is called (in this thread) after a
    loss is logged."""

    thread_name = "streamq-epoch"

    def __init__(self, connection: redis.Redis, interval: float, on_lost: Callable[[], None]) -> None:
        super().__init__()
        self.epoch = RedisEpoch(connection)
        self._interval = interval
        self._on_lost = on_lost

    def check(self) -> bool:
        try:
            lost = self.epoch.check()
        except redis.RedisError as exc:
            log.debug("epoch check: Redis error: %s", exc)
            return False
        if lost:
            log.error("%s", LOST)
            try:
                self._on_lost()
            except Exception as exc:  # e.g. Redis failing again, or a loop closing at shutdown
                log.warning("after Redis lost its data: %s", exc)
        return lost

    def _run(self) -> None:
        self.check()
        while not self._stop.wait(self._interval):
            self.check()
