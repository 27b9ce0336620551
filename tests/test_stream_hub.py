"""The front's multiplexed stream reader, against a real Redis server."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis

from api.stream_hub import StreamHub, Subscription
from tests.processes import RedisServer

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


async def drain(sub: Subscription, count: int) -> list[str]:
    out = []
    for _ in range(count):
        _, fields = await asyncio.wait_for(sub.queue.get(), timeout=10)
        out.append(fields["v"])
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
        await asyncio.sleep(0.2)  # the reader is now blocked on t2:a alone (for up to 60 s)
        second = await hub.subscribe("t2:b")
        await r.xadd("t2:b", {"v": "hello"})
        assert await drain(second, 1) == ["hello"]  # well before the 60 s block would end
        assert first.queue.empty()

    run(redis_server, body)


def test_subscriptions_resume_after_their_last_id(redis_server: RedisServer) -> None:
    async def body(hub: StreamHub, r: aioredis.Redis) -> None:
        ids = [await r.xadd("t3", {"v": str(n)}) for n in range(5)]
        everything = await hub.subscribe("t3")
        assert await drain(everything, 5) == ["0", "1", "2", "3", "4"]
        later = await hub.subscribe("t3", last_id=ids[2])
        assert await drain(later, 2) == ["3", "4"]
        await r.xadd("t3", {"v": "5"})
        assert await drain(everything, 1) == ["5"]
        assert await drain(later, 1) == ["5"]
        hub.unsubscribe(everything)
        hub.unsubscribe(later)
        assert hub.stream_count == 0

    run(redis_server, body)
