"""The front's multiplexed stream reader, against a real Redis server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import redis.asyncio as aioredis

from api.stream_hub import WAKE_KEY_LIFE, StreamHub, Subscription, parse_entry_id
from harness.redis_server import RedisServer
from shared import keys

T = TypeVar("T")


def run(
    redis_server: RedisServer,
    body: Callable[[StreamHub, aioredis.Redis], Awaitable[T]],
    block_ms: int = 60_000,
) -> T:
    async def main() -> T:
        reader = aioredis.Redis.from_url(
            redis_server.url,
            decode_responses=True,
            max_connections=1,
            socket_timeout=block_ms / 1000 + 5,
            client_name="hub-test-reader",
        )
        writer = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        hub = StreamHub(reader, writer, front_id="test", block_ms=block_ms)
        hub.start()
        try:
            return await body(hub, writer)
        finally:
            await hub.stop()
            await reader.aclose()
            await writer.aclose()

    return asyncio.run(main())


async def reader_blocked(r: aioredis.Redis) -> None:
    """Until the hub's reader is blocked in its XREAD on the server (CLIENT LIST's flag ``b``)."""
    for _ in range(500):
        for entry in await r.client_list():
            if entry.get("name") == "hub-test-reader" and "b" in entry.get("flags", ""):
                return
        await asyncio.sleep(0.01)
    raise AssertionError("the hub's reader never blocked in its XREAD")


async def drain(sub: Subscription, count: int) -> list[str]:
    out = []
    for _ in range(count):
        item = await asyncio.wait_for(sub.queue.get(), timeout=10)
        assert item is not None
        out.append(item[1]["v"])
    return out


def test_one_reader_serves_many_streams_in_order(redis_server: RedisServer) -> None:
    async def body(hub: StreamHub, r: aioredis.Redis) -> None:
        subs = [await hub.subscribe(f"t1:{i}") for i in range(50)]
        for n in range(3):
            for i in range(50):
                await r.xadd(f"t1:{i}", {"v": f"{i}.{n}"})
        for i, sub in enumerate(subs):
            assert await drain(sub, 3) == [f"{i}.0", f"{i}.1", f"{i}.2"]
        names = [c.get("name", "") for c in await r.client_list()]
        assert hub.stream_count == 50
        assert names.count("hub-test-reader") == 1  # one connection reads all 50 streams

    run(redis_server, body)


def test_a_new_subscription_joins_a_blocked_read_at_once(redis_server: RedisServer) -> None:
    async def body(hub: StreamHub, r: aioredis.Redis) -> None:
        first = await hub.subscribe("t2:a")
        await reader_blocked(r)  # on t2:a alone now (for up to 60 s)
        second = await hub.subscribe("t2:b")
        await r.xadd("t2:b", {"v": "hello"})
        assert await drain(second, 1) == ["hello"]  # well before the 60 s block would end
        assert first.queue.empty()
        # The wake-up stream is the front's own (a random id per process): it expires once its
        # front is gone, rather than stay for ever after a crash.
        assert 0 < await r.ttl(keys.hub_wakeup("test")) <= WAKE_KEY_LIFE

    run(redis_server, body)


def test_subscriptions_that_come_together_share_one_wake_up() -> None:
    """Many clients opening streams at once (a fan-out's ramp) wake the blocked read once, not once
    each, and every one of them still joins the read at once."""
    server = RedisServer()  # its own: the wake-ups are counted in its command statistics

    async def body(hub: StreamHub, r: aioredis.Redis) -> None:
        await hub.subscribe("t7:first")
        await reader_blocked(r)  # on t7:first alone
        await r.config_resetstat()
        subs = await asyncio.gather(*(hub.subscribe(f"t7:{i}") for i in range(30)))
        stats = await r.info("commandstats")
        assert stats["cmdstat_xadd"]["calls"] == 1
        for i in range(30):
            await r.xadd(f"t7:{i}", {"v": str(i)})
        assert [await drain(sub, 1) for sub in subs] == [[str(i)] for i in range(30)]

    try:
        run(server, body)
    finally:
        server.close()


def test_subscriptions_resume_after_their_last_id(redis_server: RedisServer) -> None:
    async def body(hub: StreamHub, r: aioredis.Redis) -> None:
        ids = [await r.xadd("t3", {"v": str(n)}) for n in range(5)]
        everything = await hub.subscribe("t3")
        assert await drain(everything, 5) == ["0", "1", "2", "3", "4"]
        last_id = ids[2]
        assert isinstance(last_id, str)  # the writer decodes its replies
        later = await hub.subscribe("t3", last_id=last_id)
        assert await drain(later, 2) == ["3", "4"]
        await r.xadd("t3", {"v": "5"})
        assert await drain(everything, 1) == ["5"]
        assert await drain(later, 1) == ["5"]
        hub.unsubscribe(everything)
        hub.unsubscribe(later)
        assert hub.stream_count == 0

    run(redis_server, body)


def test_a_follower_joining_mid_read_gets_the_older_entries_first() -> None:
    """Unit check of the delivery rule: entries read from a cursor newer than a follower's last
    id are held back from it; the next read, from its older id, gives it everything in order."""
    hub = StreamHub(None, None, front_id="unit")  # type: ignore[arg-type]

    async def body() -> None:
        tailing = Subscription("k", "5-0")
        hub._subs["k"] = {tailing}
        hub._cursors["k"] = "5-0"
        joining = await_subscribe(hub, "k", "0-0")  # joins while a read from 5-0 is in flight
        hub._deliver("k", [("6-0", {"v": "6"})], asked_from="5-0")
        assert [e[0] for e in drain_now(tailing)] == ["6-0"]
        assert drain_now(joining) == []
        hub._deliver("k", [(f"{n}-0", {"v": str(n)}) for n in range(1, 7)], asked_from="0-0")
        assert [e[0] for e in drain_now(joining)] == ["1-0", "2-0", "3-0", "4-0", "5-0", "6-0"]
        assert drain_now(tailing) == []

    asyncio.run(body())


def await_subscribe(hub: StreamHub, key: str, last_id: str) -> Subscription:
    sub = Subscription(key, last_id)
    hub._subs.setdefault(key, set()).add(sub)
    hub._cursors[key] = last_id
    return sub


def drain_now(sub: Subscription) -> list[tuple[str, dict[str, str]]]:
    out = []
    while not sub.queue.empty():
        item = sub.queue.get_nowait()
        assert item is not None
        out.append(item)
    return out


def test_followers_joining_a_busy_stream_miss_nothing(redis_server: RedisServer) -> None:
    async def body(hub: StreamHub, r: aioredis.Redis) -> None:
        for trial in range(10):
            key = f"t4:{trial}"
            tail = await hub.subscribe(key)

            async def produce(key: str = key) -> None:
                for n in range(60):
                    await r.xadd(key, {"v": str(n)})
                    await asyncio.sleep(0.001)

            producer = asyncio.create_task(produce())
            await asyncio.sleep(0.01 + 0.003 * trial)
            late = await hub.subscribe(key, "0-0")
            await producer
            assert await drain(tail, 60) == [str(n) for n in range(60)]
            assert await drain(late, 60) == [str(n) for n in range(60)]
            hub.unsubscribe(tail)
            hub.unsubscribe(late)

    run(redis_server, body, block_ms=5_000)


def test_ids_redis_would_refuse_are_refused_before_reading() -> None:
    hub = StreamHub(None, None, front_id="unit")  # type: ignore[arg-type]
    for bad in ("99999999999999999999999", "1-18446744073709551616", "abc", "1-", "-1", "²-0", "١٢-0"):
        with pytest.raises(ValueError, match="stream entry id"):
            asyncio.run(hub.subscribe("k", bad))
    assert parse_entry_id("18446744073709551615-0") == (2**64 - 1, 0)


def test_followers_are_told_when_redis_goes_away() -> None:
    server = RedisServer()
    try:

        async def body(hub: StreamHub, r: aioredis.Redis) -> None:
            sub = await hub.subscribe("t5")
            await asyncio.sleep(0.1)
            server.stop()
            assert await asyncio.wait_for(sub.queue.get(), timeout=10) is None
            assert sub.interrupted == "the job store (Redis) could not be read"  # not where, nor how

        run(server, body, block_ms=5_000)
    finally:
        server.close()


def test_queue_positions_come_from_one_read_per_interval(redis_server: RedisServer) -> None:
    from api.queue_positions import QueuePositions
    from shared import keys

    async def main() -> None:
        r = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
        queue = keys.rq_queue("positions-test")
        await r.delete(queue)
        await r.rpush(queue, "a", "b", "c")
        positions = QueuePositions(r, max_age=0.3)
        assert [await positions.recent("positions-test", j) for j in "abc"] == [0, 1, 2]
        await r.lpop(queue)
        await r.rpush(queue, "d")
        # Within max_age the snapshot answers (c still shows 2); a newer job is looked up exactly.
        assert await positions.recent("positions-test", "c") == 2
        assert await positions.recent("positions-test", "d") == 2
        await asyncio.sleep(0.35)
        assert [await positions.recent("positions-test", j) for j in "abcd"] == [None, 0, 1, 2]
        await r.delete(queue)
        await r.aclose()

    asyncio.run(main())
