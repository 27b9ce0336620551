"""Commands packed in one hiredis call (``shared/redis_packing.py``) are the bytes redis-py's
own packer makes, its refusals stay its own, and every pool streamq opens uses it."""

from __future__ import annotations

from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.connection import Connection

from shared.redis_connect import RedisTarget
from shared.redis_packing import OneCallPacker
from shared.settings import Settings

COMMANDS: list[tuple[object, ...]] = [
    ("SET", "key", "value"),
    ("EVALSHA", "0" * 40, 2, "streamq:job:a", "streamq:job:a:events", "run", 10_000, "", "wörd ✓", 7),
    ("XREAD", "COUNT", 500, "BLOCK", 10_000, "STREAMS", "a", "b", "0-0", "1733400000000-3"),
    ("HSET", b"bytes-key", b"\x00\xff", "f", 0.1, "g", 1e20, "h", -0.0, "i", float("inf"), "j", 2**70),
    ("SET", "k", memoryview(b"view")),
    ("CLIENT SETNAME", "streamq-front"),  # redis-py splits a name with a space in it
    (b"CLIENT SETNAME", b"streamq-front"),
    ("CLIENT\tSETNAME", "streamq-front"),  # any whitespace
    (bytearray(b"PING"),),
    ("SET", "k", bytearray(b"array")),  # hiredis refuses bytearrays: redis-py packs it
]


def _packer(pool: Any) -> Any:
    """The packer of a connection the pool makes."""
    return pool.make_connection()._command_packer


def _packers() -> tuple[OneCallPacker, Connection]:
    connection = Connection()
    return OneCallPacker(connection._command_packer), connection


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: str(c[0]))
def test_a_command_packs_to_the_bytes_redis_py_makes(command: tuple[object, ...]) -> None:
    fast, connection = _packers()
    assert b"".join(fast.pack(*command)) == b"".join(connection.pack_command(*command))


def test_what_redis_py_refuses_it_still_refuses_in_its_own_words() -> None:
    fast, _connection = _packers()
    for value in (True, None, [1]):
        with pytest.raises(redis.DataError):
            fast.pack("SET", "k", value)
    with pytest.raises(UnicodeEncodeError):
        fast.pack("SET", "k", "\ud800")


def test_every_pool_streamq_opens_packs_in_one_call_where_it_packs_alike() -> None:
    target = RedisTarget.of(Settings(redis_url="redis://127.0.0.1:1/0"))
    sync_pools = [target.sync_pool(), target.sync_pool(blocking_timeout=1.0)]
    for pool in sync_pools:
        assert isinstance(_packer(pool), OneCallPacker)
    async_pool = target.async_pool(blocking_timeout=1.0)
    assert isinstance(_packer(async_pool), OneCallPacker)
    sentinels = RedisTarget.of(Settings(redis_sentinels="s1:26379"))
    assert isinstance(_packer(sentinels.sync_pool()), OneCallPacker)
    # A URL that asks for another encoding keeps redis-py's packer (hiredis would write UTF-8).
    latin = RedisTarget.of(Settings(redis_url="redis://127.0.0.1:1/0?encoding=latin-1"))
    assert not isinstance(_packer(latin.sync_pool()), OneCallPacker)
    assert isinstance(async_pool, aioredis.ConnectionPool)
