"""A response's record lives as long as its job can (RedisJobClient against a real Redis): a
job continued after a crash may end later than its records' first life, and its response must
stay readable and continuable for the result TTL after that end; it keeps pace with a job that
lives longer still."""

from __future__ import annotations

import asyncio

from api.metrics import FrontMetrics
from api.redis_job_client import RedisJobClient
from harness.redis_server import RedisServer
from shared import keys
from shared.settings import Settings


def test_a_records_ttl_covers_every_run_and_keeps_pace_with_its_job(redis_server: RedisServer) -> None:
    settings = Settings(
        redis_url=redis_server.url, queue_ttl=60, job_timeout=100, result_ttl=300, max_attempts=3
    )
    redis = redis_server.client(decode_responses=True)

    async def scenario() -> None:
        jobs = await RedisJobClient.open(settings, FrontMetrics())
        try:
            await jobs.save_response("j1", "alice", '{"id": "resp_j1"}')
            ttl = redis.ttl(keys.response("j1"))
            assert ttl >= 60 + 3 * (100 + 60) + 300 - 2  # each run a continued job may get
            redis.hset(keys.job("j1"), "status", "finished")
            assert await jobs.load_response("j1", "bob") is None  # another key's: none
            redis.expire(keys.response("j1"), 5)
            redis.expire(keys.job("j1"), 900)  # the job outlives its record (a late end)
            assert await jobs.load_response("j1", "alice") == '{"id": "resp_j1"}'
            assert redis.ttl(keys.response("j1")) > 800  # kept with its job
            redis.delete(keys.job("j1"))
            assert await jobs.load_response("j1", "alice") is None  # its job is gone: so is it
        finally:
            await jobs.close()

    asyncio.run(scenario())
