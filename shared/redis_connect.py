"""Where Redis is, and the connection pools every process opens to it.

Redis is either one server (``STREAMQ_REDIS_URL``) or a primary that Redis Sentinel manages
(``STREAMQ_REDIS_SENTINELS`` and ``STREAMQ_REDIS_SENTINEL_MASTER``; the URL then gives only the
database number, user and password). A Sentinel pool asks the sentinels for the primary each time
it opens a connection and, while used, once a second; it drops a connection made for another
server or that meets a former primary (now a read-only replica), and so follows a failover by
itself: no restart, no configuration change. Fronts, workers, RQ's
connections and the janitor all get their pools here.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as async_sentinel
import redis.sentinel as sync_sentinel

from shared.redis_packing import pack_in_one_call
from shared.settings import Settings

SENTINEL_TIMEOUT = 2.0  # seconds a sentinel may take to answer (then the next one is asked)


PRIMARY_RECHECK = 1.0  # seconds between a pool's questions to the sentinels, while it is used


class _FollowsPrimary(sync_sentinel.SentinelConnectionPool):
    """A Sentinel pool that, while used, asks the sentinels for the primary at most once a
    second, and drops a connection made for another: a failover they were told to make
    (``SENTINEL FAILOVER``) leaves the old primary up and writable until they reconfigure it,
    seconds later, and a pool that asked only when it opened a connection wrote there meanwhile
    (a job accepted there vanished with it; a worker beating there looked dead on the new one).
    The question runs in a thread of its own: no caller waits for a sentinel that is slow or
    gone (a lease renewal that did would let its lease lapse)."""

    _primary_asked = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._asking = threading.Lock()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if self.is_master and now - self._primary_asked >= PRIMARY_RECHECK and self._asking.acquire(False):
            self._primary_asked = now
            try:
                threading.Thread(target=self._ask, name="streamq-sentinel-ask", daemon=True).start()
            except RuntimeError:  # no thread to be had (the interpreter is stopping): not this time
                self._asking.release()
        connection = super().get_connection(*args, **kwargs)
        if self.is_master and _elsewhere(connection, self.master_address):
            connection.disconnect()  # it connects to the primary again at its first command
        return connection

    def _ask(self) -> None:
        try:
            with contextlib.suppress(redis.RedisError, OSError):  # none named: connecting says so
                self.get_master_address()  # another: idle connections close, in-use ones on release
        finally:
            self._asking.release()


class _SentinelPool(_FollowsPrimary):
    """A Sentinel pool that fails at once when all its connections are in use."""


class _BlockingSentinelPool(_FollowsPrimary, redis.BlockingConnectionPool):
    """A Sentinel pool whose requests wait for a free connection (as the front's other pools do)
    instead of failing when all are in use."""


class _AsyncBlockingSentinelPool(async_sentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """The asyncio twin of ``_BlockingSentinelPool`` (its question to the sentinels a task)."""

    _primary_asked = 0.0
    _asking: asyncio.Task[None] | None = None

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        due = self.is_master and now - self._primary_asked >= PRIMARY_RECHECK
        if due and (self._asking is None or self._asking.done()):
            self._primary_asked = now
            self._asking = asyncio.get_running_loop().create_task(self._ask())
        connection = await super().get_connection(*args, **kwargs)
        if self.is_master and _elsewhere(connection, self.master_address):
            try:
                await connection.disconnect(nowait=True)
            except BaseException:  # cancelled: the connection is the pool's again, not lost
                await self.release(connection)
                raise
        return connection

    async def _ask(self) -> None:
        with contextlib.suppress(redis.RedisError, OSError):
            await self.get_master_address()


def _elsewhere(connection: Any, primary: Any) -> bool:
    """Whether ``connection`` is open to another server than ``primary`` (host, port)."""
    return bool(primary and connection.is_connected and (connection.host, connection.port) != tuple(primary))


_SENTINEL_ERRORS = (redis.ConnectionError, redis.ResponseError, redis.TimeoutError)


class _Newest:
    """The primary of the newest configuration the sentinels hold (the highest config epoch),
    asking each: redis-py took the first sentinel's answer, and one that has not yet heard of a
    failover names the old primary, which stays up and writable until the sentinels reconfigure
    it (``SENTINEL FAILOVER``: seconds), so new connections went back there."""

    def __init__(self, service_name: str) -> None:
        self.service_name = service_name
        self.best: tuple[int, tuple[str, int]] | None = None
        self.errors: list[str] = []

    def heard(self, masters: Any, valid: Any) -> None:
        state = masters.get(self.service_name)
        if state and valid(state, self.service_name):
            epoch = int(state.get("config-epoch") or 0)
            if self.best is None or epoch > self.best[0]:
                self.best = (epoch, (state["ip"], state["port"]))

    def failed(self, sentinel: Any, exc: Exception) -> None:
        self.errors.append(f"{sentinel} - {exc!r}: {exc}")

    def primary(self) -> tuple[str, int]:
        if self.best is None:
            found = f" : {', '.join(self.errors)}" if self.errors else ""
            raise sync_sentinel.MasterNotFoundError(f"No master found for {self.service_name!r}{found}")
        return self.best[1]


class _Sentinels(sync_sentinel.Sentinel):
    def discover_master(self, service_name: str) -> tuple[str, int]:
        newest = _Newest(service_name)
        for sentinel in self.sentinels:
            try:
                newest.heard(sentinel.sentinel_masters(), self.check_master_state)
            except _SENTINEL_ERRORS as exc:
                newest.failed(sentinel, exc)
        return newest.primary()


class _SyncedReplicas(async_sentinel.Sentinel):
    """Sentinel that hands out only replicas in sync with the primary (link up, not down): one
    that is still loading a full copy would serve old or no data; and the newest primary."""

    def filter_slaves(self, slaves: Any) -> Any:
        return [
            (replica["ip"], replica["port"])
            for replica in slaves
            if not (replica["is_odown"] or replica["is_sdown"])
            and replica.get("master-link-status", "ok") == "ok"
        ]

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        newest = _Newest(service_name)
        for sentinel in self.sentinels:
            try:
                newest.heard(await sentinel.sentinel_masters(), self.check_master_state)
            except _SENTINEL_ERRORS as exc:
                newest.failed(sentinel, exc)
        return newest.primary()


@dataclass(frozen=True)
class RedisTarget:
    """The Redis one deployment uses: a URL, or a Sentinel-managed primary."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = "streamq"
    sentinel_password: str | None = field(default=None, repr=False)

    @classmethod
    def of(cls, settings: Settings) -> RedisTarget:
        password = settings.redis_sentinel_password.get_secret_value() or None
        return cls(
            url=settings.redis_url_or_default(),
            sentinels=tuple(settings.sentinel_addresses()),
            master=settings.redis_sentinel_master,
            sentinel_password=password,
        )

    @property
    def managed(self) -> bool:
        """Sentinel finds the primary."""
        return bool(self.sentinels)

    def describe(self) -> str:
        """For logs and messages: no password."""
        if self.managed:
            where = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{where}/{self.master}"
        return redacted(self.url)

    def primary_options(self) -> dict[str, Any]:
        """What the URL says besides the address, for the primary the sentinels name: db, user,
        password, TLS, its query options."""
        options = redis.connection.parse_url(self.url)
        for where in ("host", "port", "path"):  # the sentinels say where the primary is
            options.pop(where, None)
        if options.pop("connection_class", None) is redis.SSLConnection:  # (a Unix socket's: dropped)
            options["ssl"] = True
        return options

    def sentinel_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The options of a connection to a sentinel, given the primary's: its socket options,
        a timeout, and the sentinels' own password."""
        kwargs = {k: v for k, v in options.items() if k.startswith("socket_")}
        if kwargs.get("socket_timeout") is None:  # a silent sentinel must not hang discovery
            kwargs["socket_timeout"] = SENTINEL_TIMEOUT
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def sync_pool(self, *, blocking_timeout: float | None = None, **options: Any) -> redis.ConnectionPool:
        """A pool for redis-py's synchronous client (RQ, the workers, the janitor, the CLI).
        ``blocking_timeout``: requests wait that long for a free connection (else: fail at once)."""
        return pack_in_one_call(self._sync_pool(blocking_timeout, options))

    def _sync_pool(self, blocking_timeout: float | None, options: dict[str, Any]) -> redis.ConnectionPool:
        if not self.managed:
            if blocking_timeout is None:
                return redis.ConnectionPool.from_url(self.url, **options)
            return redis.BlockingConnectionPool.from_url(self.url, timeout=blocking_timeout, **options)
        options = {**self.primary_options(), **options}
        manager = _Sentinels(list(self.sentinels), sentinel_kwargs=self.sentinel_options(options))
        if blocking_timeout is None:
            return _SentinelPool(self.master, manager, **options)
        return _BlockingSentinelPool(self.master, manager, timeout=blocking_timeout, **options)

    def async_pool(
        self, *, blocking_timeout: float, replica: bool = False, **options: Any
    ) -> aioredis.ConnectionPool:
        """A pool for redis-py's asyncio client (the front), waiting up to ``blocking_timeout``
        for a free connection under load. ``replica``: with Sentinel, to a replica in sync (the
        primary when there is none), for reads that must not run ahead of the replicas."""
        return pack_in_one_call(self._async_pool(blocking_timeout, replica, options))

    def _async_pool(
        self, blocking_timeout: float, replica: bool, options: dict[str, Any]
    ) -> aioredis.ConnectionPool:
        if not self.managed:
            return aioredis.BlockingConnectionPool.from_url(self.url, timeout=blocking_timeout, **options)
        options = {**self.primary_options(), **options}
        sentinel_kwargs = self.sentinel_options(options)
        manager = _SyncedReplicas(list(self.sentinels), sentinel_kwargs=sentinel_kwargs)
        return _AsyncBlockingSentinelPool(
            self.master, manager, timeout=blocking_timeout, is_master=not replica, **options
        )

    def client(self, **options: Any) -> redis.Redis:
        """A synchronous client on a pool of its own."""
        return redis.Redis(connection_pool=self.sync_pool(**options))


_SENTINEL_ERROR = re.compile(r"> - (.*?)(?=, <redis\.|$)")  # after each sentinel client's repr
_ERROR_CLASS = re.compile(r"^[\w.:]*(?:Error|Exception)(?:\(.*?\))?: ")  # "network:ConnectionError: "


def redis_problem(exc: BaseException) -> str:
    """A Redis error's message for a person. redis-py's "No master found" carries, for each
    sentinel it asked, the client's repr (a kilobyte of pool and connection internals) and the
    error it met: here the first words, then each error's own text."""
    text = str(exc)
    head, found, _ = text.partition(" : <")
    if not found:
        return text
    reasons = [_ERROR_CLASS.sub("", m.group(1)).strip() for m in _SENTINEL_ERROR.finditer(text)]
    reasons = [r for r in reasons if r]
    return f"{head}: {'; '.join(dict.fromkeys(reasons))}" if reasons else head


def redacted(url: str) -> str:
    """The Redis URL without its password: in its user part (redis://:secret@host) or its query
    (unix:///run/redis.sock?password=secret)."""
    parts = urlsplit(url)
    if parts.password is not None:
        url = url.replace(f":{parts.password}@", ":***@", 1)
    if parts.query:
        fields = [field.partition("=") for field in parts.query.split("&")]
        query = "&".join(
            f"{name}=***" if name.lower() == "password" else name + eq + value for name, eq, value in fields
        )
        url = url.replace(f"?{parts.query}", f"?{query}", 1)
    return url
