"""A worker told to stop (SIGTERM) drains: it takes no new job. Its free slots were still counted
as capacity: a job queued for its model was told it would start at once (estimated wait 0), and
/scaling and the slot gauges showed room that was not there. Now its slots are what it still
runs, from the moment it starts draining, and ``streamq status`` says so."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_for, wait_workers
from tests.processes import clean_env

pytestmark = pytest.mark.e2e

MODEL = "draining-synth"


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[str, Service, dict[str, str]]]:
    server = RedisServer()
    env = {"STREAMQ_REDIS_URL": server.url, "STREAMQ_METRICS_PORT": "0", "STREAMQ_DRAIN_SECONDS": "30"}
    started: list[Service] = []
    try:
        worker = start_synthetic_worker(env, tmp_path, MODEL, "draining-worker", tokens_per_second=5, slots=3)
        started.append(worker)
        front, url = start_front(env, tmp_path, "draining-front")
        started.append(front)
        wait_workers(url, 1)
        yield url, worker, env
    finally:
        for service in started:
            service.proc.kill()
            service.stop()
        server.close()


def test_a_draining_workers_free_slots_are_no_capacity(
    deployment: tuple[str, Service, dict[str, str]],
) -> None:
    url, worker, env = deployment
    with httpx.Client(timeout=30) as http:
        http.post(f"{url}/v1/jobs", json={"model": MODEL, "prompt": "hi", "max_tokens": 100})
        wait_for(
            lambda: http.get(f"{url}/scaling", params={"model": MODEL}).json()["running"] == 1, 20, "running"
        )
        assert http.get(f"{url}/scaling", params={"model": MODEL}).json()["slots"] == 3
        worker.proc.send_signal(signal.SIGTERM)  # it drains its job for up to 30 s
        wait_for(
            lambda: http.get(f"{url}/scaling", params={"model": MODEL}).json()["slots"] == 1, 10, "drain said"
        )
        queued = http.post(f"{url}/v1/jobs", json={"model": MODEL, "prompt": "next", "max_tokens": 5}).json()
        assert queued["status"] == "queued" and queued["estimated_wait_seconds"] != 0.0, queued
    shown = subprocess.run(
        [str(Path(sys.executable).parent / "streamq"), "status"],
        env=clean_env(STREAMQ_REDIS_URL=env["STREAMQ_REDIS_URL"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "(draining)" in shown.stdout and "1/1" in shown.stdout, shown.stdout
