"""Retention and exactly-once endings under load, on real processes with the synthetic backend."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness.redis_server import RedisServer
from harness.services import Service, start_front, wait_for, wait_workers
from tests.sse import follow

pytestmark = pytest.mark.e2e

FINAL = {"done", "error", "canceled"}


@pytest.fixture
def synthetic_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """A private Redis, one front and two synthetic workers; finished jobs are kept for the
    seconds the test asks (``indirect`` parameter), 600 by default."""
    server = RedisServer()
    env = {
        "STREAMQ_REDIS_URL": server.url,
        "STREAMQ_RESULT_TTL": str(getattr(request, "param", 600)),
        "STREAMQ_PUBLISH_INTERVAL_MS": "0",
        "STREAMQ_MAINTENANCE_INTERVAL": "2",
    }
    workers = [
        Service(
            [
                "worker",
                "--backend",
                "synthetic",
                "--tokens-per-second",
                "400",
                "--slots",
                "16",
                "--name",
                name,
            ],
            env,
            name,
            tmp_path,
        )
        for name in ("synth-a", "synth-b")
    ]
    front, url = start_front(env, tmp_path, "synth-front")
    try:
        wait_workers(url, 2)
        yield server, url
    finally:
        for service in (front, *workers):
            service.stop()
        server.close()


def test_many_short_jobs_with_random_cancels_each_end_exactly_once(synthetic_stack: Any) -> None:
    _server, url = synthetic_stack
    rng = random.Random(7)
    count = 2000
    to_cancel: set[str] = set()
    with httpx.Client(timeout=60, limits=httpx.Limits(max_connections=32)) as client:

        def submit(i: int) -> str:
            body = {"prompt": f"job {i}", "model": "synthetic", "max_tokens": rng.randint(1, 40)}
            job_id = str(client.post(f"{url}/v1/jobs", json=body).json()["id"])
            if i % 4 == 0:  # a quarter are canceled at once: queued, just started, or already done
                to_cancel.add(job_id)
                answer = client.post(f"{url}/v1/jobs/{job_id}/cancel")
                assert answer.status_code in (200, 409), answer.text  # canceled, or it had ended
            return job_id

        with ThreadPoolExecutor(16) as pool:
            ids = list(pool.map(submit, range(count)))

        def ended(job_id: str) -> list[str]:
            return [e.event for e in follow(client, url, job_id)]

        with ThreadPoolExecutor(16) as pool:
            streams = dict(zip(ids, pool.map(ended, ids), strict=True))
    for job_id, events in streams.items():
        finals = [e for e in events if e in FINAL]
        assert len(finals) == 1, (job_id, events)
        assert events.count("started") <= 1  # none ran twice
        if job_id not in to_cancel:
            assert finals == ["done"], (job_id, events)
    canceled = sum(1 for j in to_cancel if streams[j][-1] == "canceled")
    assert canceled > 0


@pytest.mark.parametrize("synthetic_stack", [2], indirect=True)
def test_after_their_ttl_finished_jobs_leave_nothing_in_redis(synthetic_stack: Any) -> None:
    server, url = synthetic_stack
    r = server.client(decode_responses=True)
    before = set(r.keys("*"))
    with httpx.Client(timeout=60) as client:
        ids = [
            client.post(f"{url}/v1/jobs", json={"prompt": "x", "model": "synthetic", "max_tokens": 3}).json()[
                "id"
            ]
            for _ in range(500)
        ]
        for job_id in ids[-5:]:
            assert follow(client, url, job_id)[-1].event == "done"
    assert len(r.keys("*")) > len(before) + 500  # each job's state was there

    def mentions_of_the_jobs() -> list[str]:
        found = []
        for key in r.keys("*"):
            kind = r.type(key)
            members = (
                r.zrange(key, 0, -1)
                if kind == "zset"
                else r.smembers(key)
                if kind == "set"
                else r.lrange(key, 0, -1)
                if kind == "list"
                else []
            )
            if ":intermediate:first_seen:" in key:
                # RQ's own marker for a job its maintenance saw mid-dequeue: bounded by RQ (24 h).
                assert 0 < r.ttl(key) <= 24 * 3600
                continue
            if any(j in key for j in ids) or any(m.split(":")[0] in ids for m in members):
                found.append(key)
        return found

    try:
        wait_for(lambda: not mentions_of_the_jobs(), 30, "finished jobs to leave Redis")
    except TimeoutError:
        pytest.fail(f"still mentioned in {mentions_of_the_jobs()}")
    # What else is there is the deployment's own bookkeeping (slot workers that registered
    # meanwhile, maintenance locks, the drain-rate window, the front's wake-up stream), none per job.
    bookkeeping = ("rq:worker", "rq:clean", "rq:queue", "streamq:janitor", "streamq:drained:", "streamq:hub:")
    assert [k for k in set(r.keys("*")) - before if not k.startswith(bookkeeping)] == []
