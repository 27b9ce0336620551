"""Admission control (429 with a Retry-After read off the drain rate), wait estimates, and 503 for
a known model with no live worker: a private Redis, one front and synthetic workers."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from api.admission import retry_after
from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_for
from shared import keys
from tests.sse import read_events

pytestmark = pytest.mark.e2e

MAX_QUEUED = 2
DRAIN_WINDOW = 60
WORKER_TTL = 10


@dataclass
class Mini:
    redis: RedisServer
    env: dict[str, str]
    logdir: Path
    url: str


def _served(url: str, model: str) -> bool:
    return model in [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=5).json()["data"]]


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mini]:
    server = RedisServer()
    logdir = tmp_path_factory.mktemp("admission-logs")
    env = {
        "STREAMQ_REDIS_URL": server.url,
        "STREAMQ_MAX_QUEUED": str(MAX_QUEUED),
        "STREAMQ_DRAIN_WINDOW": str(DRAIN_WINDOW),
        "STREAMQ_WORKER_TTL": str(WORKER_TTL),
        "STREAMQ_MODELS": "synth,reserved",  # `reserved` is known, though no worker ever serves it
        "STREAMQ_POSITION_POLL_INTERVAL": "0.1",
        "STREAMQ_DRAIN_SECONDS": "0",
    }
    services: list[Service] = [start_synthetic_worker(env, logdir, "synth", "synth-1")]
    try:
        front, url = start_front(env, logdir, "admission-front")
        services.append(front)
        wait_for(lambda: _served(url, "synth"), 60, "the synthetic worker")
        yield Mini(server, env, logdir, url)
    finally:
        for service in services:
            service.stop()
        server.close()


def post_job(client: httpx.Client, mini: Mini, model: str, max_tokens: int = 5) -> httpx.Response:
    return client.post(f"{mini.url}/v1/jobs", json={"model": model, "prompt": "hi", "max_tokens": max_tokens})


def fake_worker(mini: Mini, model: str, name: str) -> None:
    """A heartbeat with no worker behind it: the model looks served, but nothing takes its jobs."""
    r = mini.redis.client(decode_responses=True)
    r.hset(keys.worker(name), mapping={"model": model, "last_heartbeat": str(time.time())})
    r.zadd(keys.WORKERS, {name: time.time() + 60})


def remove_fake_worker(mini: Mini, name: str) -> None:
    r = mini.redis.client(decode_responses=True)
    r.zrem(keys.WORKERS, name)
    r.delete(keys.worker(name))


def assert_error(response: httpx.Response, status: int, type: str, code: str | None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type and error["code"] == code, error
    return dict(error)


def test_retry_after_is_the_jobs_ahead_over_the_rate_clamped() -> None:
    assert retry_after(1, 0.1, 60) == 10
    assert retry_after(3, 7 / 60, 60) == 26  # 25.7 s, rounded up
    assert retry_after(1, 100.0, 60) == 1  # never below one second
    assert retry_after(10_000, 0.01, 60) == 3600  # nor above an hour
    assert retry_after(5, 0.0, 60) == 60  # nothing ended lately: the fallback


def test_a_full_queue_is_refused_with_429_until_it_drains(mini: Mini) -> None:
    # One slot at 50 tokens/s: each job runs 3 s, so the queue stays full while this test looks.
    with httpx.Client(timeout=30) as client:
        submitted = post_job(client, mini, "synth", max_tokens=150).json()
        assert submitted["estimated_wait_seconds"] == 0.0  # an idle worker has a slot for it: no wait
        running = submitted["id"]
        wait_for(
            lambda: client.get(f"{mini.url}/v1/jobs/{running}").json()["status"] == "running", 10, "a start"
        )
        accepted = [running]
        for _ in range(MAX_QUEUED + 3):
            response = post_job(client, mini, "synth", max_tokens=150)
            if response.status_code != 202:
                break
            accepted.append(response.json()["id"])
        assert len(accepted) == MAX_QUEUED + 1  # the one the worker's slot runs, and MAX_QUEUED waiting
        error = assert_error(response, 429, "rate_limit_error", "queue_full")
        assert "full" in error["message"]
        assert response.headers["Retry-After"].isdigit()
        assert 1 <= int(response.headers["Retry-After"]) <= 3600

        with (
            openai.OpenAI(base_url=mini.url + "/v1", api_key="x", max_retries=0, timeout=30) as sdk,
            pytest.raises(openai.RateLimitError) as raised,
        ):
            sdk.chat.completions.create(model="synth", messages=[{"role": "user", "content": "hi"}])
        assert raised.value.response.headers["Retry-After"].isdigit()

        # The worker takes the next job within one job's time: then there is room again.
        wait_for(lambda: post_job(client, mini, "synth").status_code == 202, 30, "the queue to drain")
        for job_id in accepted:  # leave the worker idle for the next tests
            client.post(f"{mini.url}/v1/jobs/{job_id}/cancel")


def test_retry_after_and_wait_estimates_follow_the_drain_rate(mini: Mini) -> None:
    fake_worker(mini, "stalled", "fake-stalled")
    r = mini.redis.client(decode_responses=True)
    jobs: list[httpx.Response] = []
    with httpx.Client(timeout=30) as client:
        try:
            jobs += [post_job(client, mini, "stalled") for _ in range(MAX_QUEUED)]
            assert [j.status_code for j in jobs] == [202] * MAX_QUEUED
            assert [j.json()["estimated_wait_seconds"] for j in jobs] == [None] * MAX_QUEUED

            # Nothing ended in the last minute: the fallback is the measuring window.
            full = post_job(client, mini, "stalled")
            assert_error(full, 429, "rate_limit_error", "queue_full")
            assert full.headers["Retry-After"] == str(DRAIN_WINDOW)

            # Six jobs ended in the last minute (one earlier does not count): 0.1 job/s, and one
            # job must leave before there is room: 10 s.
            now = time.time()
            r.zadd(keys.drained("stalled"), {f"ended-{i}": now - 5 * i for i in range(6)})
            r.zadd(keys.drained("stalled"), {"long-ago": now - DRAIN_WINDOW - 30})
            time.sleep(1.1)  # the front keeps a model's rate for a second
            full = post_job(client, mini, "stalled")
            assert_error(full, 429, "rate_limit_error", "queue_full")
            assert full.headers["Retry-After"] == "10"

            # Waiting jobs are told when they should start: (position + 1) / rate.
            views = [client.get(f"{mini.url}/v1/jobs/{j.json()['id']}").json() for j in jobs]
            assert [(v["position"], v["estimated_wait_seconds"]) for v in views] == [(0, 10.0), (1, 20.0)]
            second = jobs[1].json()["id"]
            with client.stream("GET", f"{mini.url}/v1/jobs/{second}/events") as response:
                queued = next(e for e in read_events(response) if e is not None)
            assert queued.event == "queued"
            assert queued.data["position"] == 1 and queued.data["estimated_wait_seconds"] == 20.0

            # The model's worker has a slot free (2 slots, 1 job running): the first queued job
            # waits for no job to end, the second for one.
            r.hset(keys.worker("fake-stalled"), mapping={"slots": "2", "current_job": "elsewhere"})
            time.sleep(1.1)  # the front keeps the workers' heartbeats for a second
            views = [client.get(f"{mini.url}/v1/jobs/{j.json()['id']}").json() for j in jobs]
            assert [(v["position"], v["estimated_wait_seconds"]) for v in views] == [(0, 0.0), (1, 10.0)]
        finally:
            remove_fake_worker(mini, "fake-stalled")
            for job in jobs:
                client.post(f"{mini.url}/v1/jobs/{job.json()['id']}/cancel")


def test_a_known_model_without_live_workers_is_503_an_unknown_one_404(mini: Mini) -> None:
    with httpx.Client(timeout=30) as client:
        # Listed in STREAMQ_MODELS, never served.
        reserved = post_job(client, mini, "reserved")
        assert_error(reserved, 503, "service_unavailable", "model_unavailable")
        assert reserved.headers["Retry-After"] == str(WORKER_TTL)

        # Served once (its queue is known to RQ), its only worker stopped since.
        worker = start_synthetic_worker(mini.env, mini.logdir, "ephemeral", "ephemeral-1")
        try:
            wait_for(lambda: _served(mini.url, "ephemeral"), 60, "the ephemeral worker")
            assert post_job(client, mini, "ephemeral").status_code == 202
            worker.proc.send_signal(signal.SIGTERM)  # a stopping worker leaves the registry at once
            wait_for(lambda: not _served(mini.url, "ephemeral"), 30, "the worker to leave")
        finally:
            worker.stop(signal.SIGKILL)  # it has left: no need to wait for the rest of its shutdown
        gone = post_job(client, mini, "ephemeral")
        error = assert_error(gone, 503, "service_unavailable", "model_unavailable")
        assert error["param"] == "model" and "no live worker" in error["message"]
        assert gone.headers["Retry-After"] == str(WORKER_TTL)
        with (
            openai.OpenAI(base_url=mini.url + "/v1", api_key="x", max_retries=0, timeout=30) as sdk,
            pytest.raises(openai.InternalServerError),
        ):
            sdk.chat.completions.create(model="ephemeral", messages=[{"role": "user", "content": "hi"}])

        # Never seen at all: 404, as before.
        assert_error(post_job(client, mini, "never-seen"), 404, "not_found_error", "model_not_found")


def test_with_no_live_worker_at_all_any_model_is_503_to_retry(tmp_path: Path) -> None:
    """Redis restarted empty: until the workers re-announce (seconds), no model is served and RQ
    has forgotten every queue. The openai SDK raised NotFoundError for the 404 and never retried;
    a 503 it retries. (With a worker live, a name never seen stays a 404: above.)"""
    server = RedisServer()
    front, url = start_front({"STREAMQ_REDIS_URL": server.url}, tmp_path, "workerless-front")
    try:
        with (
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30) as sdk,
            pytest.raises(openai.InternalServerError) as caught,
        ):
            sdk.chat.completions.create(model="any", messages=[{"role": "user", "content": "hi"}])
        assert caught.value.status_code == 503 and caught.value.code == "model_unavailable"
        assert caught.value.response.headers["Retry-After"]
    finally:
        front.stop()
        server.close()


def test_scale_to_zero_queues_jobs_with_no_worker_and_keeps_the_front_ready(tmp_path: Path) -> None:
    """STREAMQ_SCALE_TO_ZERO (KEDA minReplicaCount 0): a job for a model in STREAMQ_MODELS waits
    in its queue while no worker is live, the front stays ready, and the worker that starts
    (because the queue grew) runs it."""
    server = RedisServer()
    env = {"STREAMQ_REDIS_URL": server.url, "STREAMQ_MODELS": "cold", "STREAMQ_SCALE_TO_ZERO": "1"}
    front, url = start_front(env, tmp_path, "zero-front")
    services = [front]
    try:
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        job = httpx.post(f"{url}/v1/jobs", json={"prompt": "hi", "max_tokens": 3}, timeout=10)
        assert job.status_code == 202 and job.json()["model"] == "cold"
        assert server.client().llen(keys.rq_queue("cold")) == 1, "the queue an autoscaler watches grew"
        load = httpx.get(f"{url}/scaling", params={"model": "cold"}, timeout=5).json()
        assert load == {"model": "cold", "queued": 1, "running": 0, "slots": 0, "load": 1}
        unknown = httpx.post(f"{url}/v1/jobs", json={"prompt": "hi", "model": "other"}, timeout=10)
        assert unknown.status_code == 404
        # A name the autoscaler misspelt: a 404 naming it, not zeros that would never scale.
        misspelt = httpx.get(f"{url}/scaling", params={"model": "cld"}, timeout=5)
        assert misspelt.status_code == 404 and misspelt.json()["error"]["param"] == "model"
        services.append(start_synthetic_worker(env, tmp_path, "cold", "cold-1"))
        with httpx.stream("GET", f"{url}/v1/jobs/{job.json()['id']}/events", timeout=60) as r:
            events = [e.event for e in read_events(r) if e is not None]
        assert events[-1] == "done"
        load = httpx.get(f"{url}/scaling", params={"model": "cold"}, timeout=5).json()
        assert load["queued"] == 0 and load["slots"] == 1
    finally:
        for service in services:
            service.stop()
        server.close()
