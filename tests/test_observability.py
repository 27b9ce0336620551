"""What an operator watches: /metrics on the front and on each worker, JSON logs, `streamq status`.

A private stack of real processes: one Redis, one front, a tiny-model worker and a slow
synthetic worker (one slot, so its jobs queue), every process logging JSON.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from harness.redis_server import RedisServer
from harness.services import Service, _answers, start_synthetic_worker, start_worker, wait_for, wait_workers
from shared import keys
from streamq.processes import free_port
from tests.processes import ROOT
from tests.sse import follow

pytestmark = pytest.mark.e2e

TINY = "streamq-tiny"
SLOW = "slow-synthetic"
SECRET_PROMPT = "zebra-unicorn-7431 please keep this out of the logs"


@dataclass
class OpsStack:
    redis: RedisServer
    url: str
    env: dict[str, str]
    front: Service
    tiny: Service
    slow: Service

    def worker_metrics_url(self, worker: str) -> str:
        port = self.redis.client(decode_responses=True).hget(keys.worker(worker), "metrics_port")
        assert port, f"worker {worker} announced no metrics port"
        assert isinstance(port, str)  # a decoding client's reply
        return f"http://127.0.0.1:{port}/metrics"


@pytest.fixture(scope="module")
def ops(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsStack]:
    logdir = tmp_path_factory.mktemp("ops-logs")
    redis_server = RedisServer()
    env = {
        "STREAMQ_REDIS_URL": redis_server.url,
        "STREAMQ_TORCH_THREADS": "1",
        "STREAMQ_LOG_FORMAT": "json",
        "STREAMQ_METRICS_HOST": "127.0.0.1",
    }
    started: list[Service] = []  # each one stopped below, whatever fails while they start
    try:
        tiny = start_worker(
            {**env, "STREAMQ_SLOTS": "2", "STREAMQ_METRICS_PORT": str(free_port())},
            logdir,
            str(tiny_model),
            "ops-tiny",
        )
        started.append(tiny)
        slow = start_synthetic_worker(
            {**env, "STREAMQ_METRICS_PORT": str(free_port())}, logdir, SLOW, "ops-slow", tokens_per_second=2
        )
        started.append(slow)
        port = free_port()
        front = Service(["api", "--port", str(port), "--log-level", "info"], env, "ops-front", logdir)
        started.append(front)
        url = f"http://127.0.0.1:{port}"
        stack = OpsStack(redis_server, url, env, front, tiny, slow)
        wait_for(lambda: _answers(url) or not front.alive(), 60, "the front to listen")
        wait_workers(url, 2)
        yield stack
    finally:
        for service in started:
            service.stop()
        redis_server.close()


def scrape(url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page: (name, labels) → value."""
    response = httpx.get(url, timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def submit(client: httpx.Client, url: str, model: str, content: str, max_tokens: int) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens}
    response = client.post(f"{url}/v1/jobs", json={**body, "temperature": 0})
    assert response.status_code == 202, response.text
    return dict(response.json())


def test_metrics_count_jobs_on_the_worker_and_the_front(ops: OpsStack) -> None:
    worker_url = ops.worker_metrics_url("ops-tiny")
    before, front_before = scrape(worker_url), scrape(f"{ops.url}/metrics")
    with httpx.Client(timeout=60) as client:
        jobs = [submit(client, ops.url, TINY, f"{SECRET_PROMPT} {i}", 6 + i) for i in range(3)]
        done = [follow(client, ops.url, job["id"])[-1] for job in jobs]
        assert [e.event for e in done] == ["done"] * 3
        views = [client.get(f"{ops.url}/v1/jobs/{job['id']}").json() for job in jobs]
    tokens = [v["usage"]["completion_tokens"] for v in views]
    m = {"model": TINY}
    # A worker counts a job's end just after publishing it: the client may see `done` first.
    wait_for(
        lambda: (
            value(scrape(worker_url), "streamq_jobs_total", status="finished", **m)
            - value(before, "streamq_jobs_total", status="finished", **m)
            == 3
        ),
        10,
        "the worker to count the three ends",
    )
    after, front = scrape(worker_url), scrape(f"{ops.url}/metrics")

    def grew(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("streamq_jobs_total", status="finished", **m) == 3
    assert grew("streamq_jobs_total", status="failed", **m) == 0
    assert grew("streamq_generated_tokens_total", **m) == sum(tokens)
    assert grew("streamq_queue_wait_seconds_count", **m) == 3
    assert grew("streamq_time_to_first_token_seconds_count", **m) == 3
    assert grew("streamq_inter_token_latency_seconds_count", **m) == sum(1 for t in tokens if t > 1)
    assert grew("streamq_engine_step_seconds_count", **m) >= max(tokens)
    # A histogram's +Inf bucket holds every observation.
    assert value(after, "streamq_time_to_first_token_seconds_bucket", le="+Inf", **m) == value(
        after, "streamq_time_to_first_token_seconds_count", **m
    )
    assert value(after, "streamq_worker_slots", **m) == 2
    assert value(after, "streamq_worker_jobs_running", **m) == 0
    assert value(after, "streamq_worker_slots_free", **m) == 2
    info = {"worker": "ops-tiny", "model": TINY, "device": "cpu", "dtype": "float32"}
    assert value(after, "streamq_worker_info", **info) == 1

    submitted = value(front, "streamq_jobs_submitted_total", **m)
    assert submitted - value(front_before, "streamq_jobs_submitted_total", **m) == 3
    assert value(front, "streamq_queue_depth", **m) == 0
    assert value(front, "streamq_workers", **m) == 1
    assert value(front, "streamq_slots", **m) == 2
    assert ("streamq_redis_errors_total", frozenset({("component", "front")})) in front


def test_failures_are_counted_by_type_and_refusals_by_code(ops: OpsStack) -> None:
    """A job the request's own schema fails (the request's fault) is counted apart from the
    service's failures; an error answer of the front is counted by status and code."""
    worker_url = ops.worker_metrics_url("ops-tiny")
    before, front_before = scrape(worker_url), scrape(f"{ops.url}/metrics")
    bad_schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}
    body = {"model": TINY, "prompt": "x", "max_tokens": 4, "response_format": bad_schema}
    with httpx.Client(timeout=60) as client:
        job = client.post(f"{ops.url}/v1/jobs", json=body).json()
        assert follow(client, ops.url, job["id"])[-1].data["type"] == "invalid_request_error"
        assert client.get(f"{ops.url}/v1/jobs/no-such-job").status_code == 404
    m = {"model": TINY}

    def counted() -> bool:
        now = scrape(worker_url)
        return (
            value(now, "streamq_jobs_total", status="failed", **m)
            - value(before, "streamq_jobs_total", status="failed", **m)
            == 1
        )

    wait_for(counted, 10, "the worker to count the failure")
    after, front = scrape(worker_url), scrape(f"{ops.url}/metrics")
    by_type = {"type": "invalid_request_error", **m}
    assert (
        value(after, "streamq_jobs_failed_total", **by_type)
        - value(before, "streamq_jobs_failed_total", **by_type)
        == 1
    )
    refused = {"status": "404", "code": "job_not_found"}
    assert (
        value(front, "streamq_api_errors_total", **refused)
        - value(front_before, "streamq_api_errors_total", **refused)
        == 1
    )


def test_status_lists_workers_and_queue_depth_and_cancels_are_timed(ops: OpsStack) -> None:
    slow_metrics = ops.worker_metrics_url("ops-slow")
    with httpx.Client(timeout=30) as client:
        running = submit(client, ops.url, SLOW, "first", 1000)  # 500 s at 2 tokens/s: holds the one slot
        wait_for(
            lambda: client.get(f"{ops.url}/v1/jobs/{running['id']}").json()["status"] == "running",
            30,
            "the slow worker to start the first job",
        )
        waiting = [submit(client, ops.url, SLOW, f"next {i}", 1000) for i in range(2)]
        # Busy slots are what each worker's last heartbeat said (every STREAMQ_HEARTBEAT_INTERVAL).
        announced = ops.redis.client(decode_responses=True)
        wait_for(
            lambda: running["id"] in str(announced.hget(keys.worker("ops-slow"), "current_job")),
            30,
            "the slow worker's heartbeat to announce its job",
        )

        out = subprocess.run(
            [sys.executable, "-m", "streamq", "status"],
            env={**ops.env, "PATH": str(Path(sys.executable).parent)},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, out.stderr
        queues, rest = out.stdout.split("workers", 1)
        workers, jobs = rest.split("jobs by state", 1)
        assert any(row.split()[:5] == ["│", SLOW, "│", "2", "│"] for row in queues.splitlines())
        assert any(row.split()[:3] == ["│", TINY, "│"] for row in queues.splitlines())
        slow_row = next(r for r in workers.splitlines() if "ops-slow" in r)
        assert SLOW in slow_row and "1/1" in slow_row and "none" in slow_row  # model, slots, device
        tiny_row = next(r for r in workers.splitlines() if "ops-tiny" in r)
        assert "0/2" in tiny_row and "cpu" in tiny_row
        assert any(r.split()[:9] == ["│", SLOW, "│", "2", "│", "1", "│", "0", "│"] for r in jobs.splitlines())

        rq_info = subprocess.run(
            [str(Path(sys.executable).parent / "rq"), "info", "-u", ops.redis.url, "--only-queues"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert rq_info.returncode == 0 and keys.queue_name(SLOW) in rq_info.stdout, rq_info.stderr

        front = scrape(f"{ops.url}/metrics")
        assert value(front, "streamq_queue_depth", model=SLOW) == 2
        assert value(front, "streamq_queue_oldest_wait_seconds", model=SLOW) > 0
        assert value(front, "streamq_slots_busy", model=SLOW) == 1
        assert value(scrape(slow_metrics), "streamq_worker_slots_free", model=SLOW) == 0

        for job in [*waiting[1:], running, waiting[0]]:  # one still queued, then the running ones
            if job is waiting[0]:
                wait_for(
                    lambda: client.get(f"{ops.url}/v1/jobs/{waiting[0]['id']}").json()["status"] == "running",
                    30,
                    "the next job to start",
                )
            assert client.post(f"{ops.url}/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"

    front = scrape(f"{ops.url}/metrics")
    assert value(front, "streamq_cancel_latency_seconds_count", state="queued") == 1
    assert value(front, "streamq_cancel_latency_seconds_count", state="running") == 2
    assert value(front, "streamq_queue_depth", model=SLOW) == 0
    worker = scrape(slow_metrics)
    assert value(worker, "streamq_jobs_total", model=SLOW, status="canceled") == 2
    assert value(worker, "streamq_worker_jobs_running", model=SLOW) == 0


def _json_lines(service: Service) -> list[dict[str, Any]]:
    lines = [line for line in service.log().splitlines() if line.strip()]
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            pytest.fail(f"{service.name} wrote a line that is not JSON: {line!r}")
    return parsed


def test_json_logs_hold_each_lifecycle_step_and_no_prompt(ops: OpsStack) -> None:
    with httpx.Client(timeout=60) as client:
        job = submit(client, ops.url, TINY, SECRET_PROMPT, 4)
        assert follow(client, ops.url, job["id"])[-1].event == "done"

    def lines() -> list[dict[str, Any]]:
        return _json_lines(ops.front) + _json_lines(ops.tiny)

    def mine() -> list[dict[str, Any]]:
        return [line for line in lines() if line.get("job_id") == job["id"]]

    # The worker logs the end just after publishing it: the client may see `done` first.
    wait_for(lambda: any(line["event"] == "finished" for line in mine()), 10, "the finished line")
    for line in lines():
        assert {"ts", "level", "logger", "message"} <= set(line)
    steps = {line["event"]: line for line in mine()}
    assert set(steps) == {"queued", "started", "finished"}, mine()
    assert all(line["model"] == TINY for line in mine())
    assert steps["started"]["worker"] == "ops-tiny" and steps["started"]["queue_seconds"] >= 0
    finished = steps["finished"]
    assert finished["worker"] == "ops-tiny" and finished["completion_tokens"] > 0
    assert finished["run_seconds"] >= finished["first_token_seconds"] >= 0
    for service in (ops.front, ops.tiny, ops.slow):
        assert "zebra-unicorn" not in service.log(), f"{service.name} logged a prompt"
    # Requests are access lines; health probes from this host (streamq up polls) are not.
    httpx.get(f"{ops.url}/readyz")
    httpx.get(f"{ops.url}/healthz")
    wait_for(
        lambda: any("/v1/jobs" in line["message"] for line in _json_lines(ops.front)), 10, "an access line"
    )
    assert not any(
        "/readyz" in line["message"] or "/healthz" in line["message"] for line in _json_lines(ops.front)
    )


def test_a_workers_job_counts_are_there_from_its_start_with_process_metrics(ops: OpsStack) -> None:
    """Every status's series exists at 0 before its first job ends (increase() over a series
    that appears with its first event misses that event); fronts and workers have the process
    metrics prometheus_client's default registry has."""
    after = scrape(ops.worker_metrics_url("ops-slow"))
    for status in ("finished", "failed", "canceled", "requeued", "lost", "missing"):
        assert ("streamq_jobs_total", frozenset({("model", SLOW), ("status", status)})) in after, status
    # The processes' own: memory, CPU, start time (restarts and OOMs show).
    for scraped in (after, scrape(f"{ops.url}/metrics")):
        assert value(scraped, "process_resident_memory_bytes") > 0
        assert value(scraped, "process_start_time_seconds") > 0
