"""Where Redis is: a URL, or sentinels and a master name (``STREAMQ_REDIS_SENTINELS``). The pools
are built without connecting, so what each would connect with can be checked here; the failover
itself is tested against real sentinels in tests/test_redis_failover.py."""

from __future__ import annotations

import pytest
import redis
import redis.asyncio as aioredis
import redis.sentinel
from pydantic import ValidationError

from shared.redis_connect import RedisTarget
from shared.settings import Settings


def test_sentinel_addresses_parse_and_bad_ones_are_refused_by_name() -> None:
    s = Settings(redis_sentinels=" s1:26380, s2 ,[::1]:26381")
    assert s.sentinel_addresses() == [("s1", 26380), ("s2", 26379), ("::1", 26381)]
    for bad in ("s1:port", ":26379", "s1:0", "s1:70000"):
        with pytest.raises(ValidationError, match="sentinel address"):
            Settings(redis_sentinels=bad)


def test_replicas_waited_for_default_to_one_with_sentinels_only() -> None:
    assert Settings().replicas_to_wait_for() == 0
    assert Settings(redis_sentinels="s1:26379").replicas_to_wait_for() == 1
    assert Settings(redis_sentinels="s1:26379", redis_wait_replicas=0).replicas_to_wait_for() == 0
    assert Settings(redis_wait_replicas=2).replicas_to_wait_for() == 2
    # The WAIT runs within one command's timeout, or a slow replica would time the submit out.
    with pytest.raises(ValidationError, match="STREAMQ_REDIS_WAIT_MS"):
        Settings(redis_sentinels="s1:26379", redis_wait_ms=1000, redis_command_timeout=1.0)
    assert Settings(redis_wait_ms=5000).redis_wait_ms == 5000  # no replicas waited for: no limit


def test_a_password_in_the_urls_query_is_hidden_too() -> None:
    from shared.redis_connect import redacted

    assert (
        redacted("unix:///run/redis.sock?db=2&password=s3cret") == "unix:///run/redis.sock?db=2&password=***"
    )
    assert redacted("redis://:s3cret@h:1/0?Password=s3cret") == "redis://:***@h:1/0?Password=***"
    assert redacted("redis://h:1/0?socket_connect_timeout=1") == "redis://h:1/0?socket_connect_timeout=1"


def test_a_plain_url_gives_plain_pools() -> None:
    target = RedisTarget.of(Settings(redis_url="redis://:secret@h:6390/3"))
    assert not target.managed and target.describe() == "redis://:***@h:6390/3"
    pool = target.sync_pool(blocking_timeout=1.0, max_connections=2)
    assert isinstance(pool, redis.BlockingConnectionPool)
    assert (pool.connection_kwargs["host"], pool.connection_kwargs["db"]) == ("h", 3)


def test_sentinel_pools_keep_the_urls_db_and_password_and_wait_for_a_connection() -> None:
    settings = Settings(
        redis_url="redis://:secret@ignored:1/2",
        redis_sentinels="s1:26380,s2:26381",
        redis_sentinel_master="prod",
        redis_sentinel_password="sentinel-secret",
    )
    target = RedisTarget.of(settings)
    assert target.managed and "secret" not in target.describe() and "prod" in target.describe()
    pool = target.sync_pool(blocking_timeout=1.0, max_connections=2, socket_timeout=3)
    assert isinstance(pool, redis.sentinel.SentinelConnectionPool)
    assert isinstance(pool, redis.BlockingConnectionPool)  # waits for a free connection
    assert pool.service_name == "prod"
    assert (pool.connection_kwargs["db"], pool.connection_kwargs["password"]) == (2, "secret")
    assert "host" not in pool.connection_kwargs  # the sentinels say where the primary is
    sentinels = pool.sentinel_manager.sentinels
    assert [
        (c.connection_pool.connection_kwargs["host"], c.connection_pool.connection_kwargs["port"])
        for c in sentinels
    ] == [("s1", 26380), ("s2", 26381)]
    assert sentinels[0].connection_pool.connection_kwargs["password"] == "sentinel-secret"
    apool = target.async_pool(blocking_timeout=1.0, max_connections=2)
    assert isinstance(apool, aioredis.BlockingConnectionPool) and apool.service_name == "prod"  # type: ignore[attr-defined]
    assert isinstance(target.sync_pool(), redis.sentinel.SentinelConnectionPool)


class _Answers:
    """A sentinel's answer to ``SENTINEL MASTERS`` (what redis-py's client parses it into)."""

    def __init__(self, port: int | None, epoch: int = 0) -> None:
        self.port, self.epoch = port, epoch

    def masters(self) -> dict[str, dict[str, object]]:
        if self.port is None:
            raise redis.ConnectionError("refused")
        state = {"ip": "127.0.0.1", "port": self.port, "config-epoch": self.epoch, "is_master": True}
        return {"streamq": state | {"is_sdown": False, "is_odown": False, "num-other-sentinels": 2}}

    def sentinel_masters(self) -> dict[str, dict[str, object]]:
        return self.masters()


class _AsyncAnswers(_Answers):
    async def sentinel_masters(self) -> dict[str, dict[str, object]]:  # type: ignore[override]
        return self.masters()


# The first sentinel has not heard of the failover yet (the old primary, which a commanded
# failover leaves up and writable for seconds); redis-py took the first valid answer.
HEARD = [(6001, 3), (None, 0), (6002, 4)]


def test_the_sync_pools_take_the_primary_of_the_newest_configuration() -> None:
    from shared.redis_connect import _Sentinels

    sentinels = _Sentinels([("s1", 1), ("s2", 2), ("s3", 3)])
    sentinels.sentinels = [_Answers(port, epoch) for port, epoch in HEARD]  # type: ignore[misc]
    assert sentinels.discover_master("streamq") == ("127.0.0.1", 6002)
    sentinels.sentinels = [_Answers(None)]  # type: ignore[list-item]
    with pytest.raises(redis.sentinel.MasterNotFoundError, match="refused"):
        sentinels.discover_master("streamq")


@pytest.mark.anyio
async def test_the_front_pools_take_the_primary_of_the_newest_configuration() -> None:
    from shared.redis_connect import _SyncedReplicas

    sentinels = _SyncedReplicas([("s1", 1), ("s2", 2), ("s3", 3)])
    sentinels.sentinels = [_AsyncAnswers(port, epoch) for port, epoch in HEARD]  # type: ignore[misc]
    assert await sentinels.discover_master("streamq") == ("127.0.0.1", 6002)
