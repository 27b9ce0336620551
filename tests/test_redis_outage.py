"""Redis stopped and restarted under a running front: quick 503s meanwhile, no hung streams, and
service again afterwards without restarting the front (private Redis, front, synthetic worker)."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest

from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_for
from tests.sse import SSE, follow, read_events

pytestmark = pytest.mark.e2e

QUICK = 3.0  # seconds: a generous bound for "answers within about a second"


@dataclass
class Outage:
    redis: RedisServer
    url: str
    services: list[Service]


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Outage]:
    server = RedisServer()
    logdir = tmp_path_factory.mktemp("outage-logs")
    env = {
        "STREAMQ_REDIS_URL": server.url,
        "STREAMQ_PING_INTERVAL": "0.5",
        "STREAMQ_DRAIN_SECONDS": "0",
    }
    # Two slots: the job running when Redis goes away (lost with it) holds one until its end.
    services = [start_synthetic_worker(env, logdir, "synth", "outage-worker", slots=2)]
    try:
        front, url = start_front(env, logdir, "outage-front")
        services.append(front)
        wait_for(lambda: httpx.get(f"{url}/readyz", timeout=5).status_code == 200, 60, "a ready front")
        yield Outage(server, url, services)
    finally:
        for service in services:
            service.stop()
        server.close()


class Load(threading.Thread):
    """Submits short jobs and polls one job over and over; records every answer and its time."""

    def __init__(self, url: str, job_id: str) -> None:
        super().__init__(daemon=True)
        self.url, self.job_id = url, job_id
        self.answers: list[tuple[str, int, float, httpx.Response]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self.stop.is_set():
                for name, call in (
                    (
                        "submit",
                        lambda: client.post(f"{self.url}/v1/jobs", json={"prompt": "x", "max_tokens": 2}),
                    ),
                    ("poll", lambda: client.get(f"{self.url}/v1/jobs/{self.job_id}")),
                ):
                    started = time.monotonic()
                    response = call()
                    self.answers.append((name, response.status_code, time.monotonic() - started, response))
                time.sleep(0.05)


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert response.json()["error"]["type"] == "service_unavailable"
    assert response.headers["Retry-After"].isdigit()


def test_a_redis_outage_is_503_at_once_and_service_resumes_after_it(outage: Outage) -> None:
    url = outage.url
    with httpx.Client(timeout=30) as client:
        running = client.post(f"{url}/v1/jobs", json={"prompt": "long", "max_tokens": 500}).json()
        load = Load(url, running["id"])
        load.start()

        # An SSE client reading the running job when Redis goes away.
        events: list[SSE | None] = []
        streaming = threading.Event()
        stream_ended = threading.Event()
        stream_error: list[BaseException] = []

        def read_stream() -> None:
            try:
                with (
                    httpx.Client(timeout=httpx.Timeout(30, read=20)) as sse_client,
                    sse_client.stream("GET", f"{url}/v1/jobs/{running['id']}/events") as response,
                ):
                    for event in read_events(response):
                        events.append(event)
                        if event is not None and event.event == "delta":
                            streaming.set()
            except BaseException as exc:  # reported by the test below
                stream_error.append(exc)
            finally:
                stream_ended.set()

        reader = threading.Thread(target=read_stream, daemon=True)
        reader.start()
        assert streaming.wait(30), events

        outage.redis.stop()
        down_at = time.monotonic()
        try:
            # The open stream ends (resumable: no final event), it does not hang.
            assert stream_ended.wait(10), "the SSE stream hung after Redis went away"
            assert not stream_error, stream_error
            finals = [e for e in events if e is not None and e.event in ("done", "error", "canceled")]
            assert finals == [] or finals[-1].event == "error"

            for method, path, body in (
                ("GET", f"/v1/jobs/{running['id']}", None),
                ("GET", f"/v1/jobs/{running['id']}/events", None),
                ("POST", "/v1/jobs", {"prompt": "hi", "max_tokens": 2}),
                ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
                ("GET", "/v1/models", None),
            ):
                started = time.monotonic()
                response = client.request(method, url + path, json=body)
                assert time.monotonic() - started < QUICK, (method, path)
                assert_unavailable(response)
            started = time.monotonic()
            ready = client.get(f"{url}/readyz")
            assert time.monotonic() - started < QUICK
            assert ready.status_code == 503 and ready.json()["redis"] is False
            # The deployment's gauges cannot be read: left out, with a gauge that says why.
            scraped = client.get(f"{url}/metrics").text
            assert "\nstreamq_redis_up 0.0" in scraped and "streamq_queue_depth{" not in scraped
            time.sleep(max(0.0, 1.0 - (time.monotonic() - down_at)))  # let the load meet the outage
        finally:
            outage.redis.start()

        # Ready again, same front process, and new jobs run to the end.
        wait_for(lambda: client.get(f"{url}/readyz").status_code == 200, 30, "the front to be ready again")
        assert "\nstreamq_redis_up 1.0" in client.get(f"{url}/metrics").text
        load.stop.set()
        load.join(30)
        job = client.post(f"{url}/v1/jobs", json={"prompt": "after", "max_tokens": 5})
        assert job.status_code == 202, job.text
        assert follow(client, url, job.json()["id"])[-1].event == "done"
        assert all(s.alive() for s in outage.services)

    # Under load, every answer was quick, and either a success or the 503 envelope.
    assert load.answers
    for name, status, seconds, response in load.answers:
        assert seconds < QUICK, (name, status, seconds)
        if status == 503:
            assert_unavailable(response)
        else:  # the old job may be gone with the restarted (empty) Redis
            assert status in ((202,) if name == "submit" else (200, 404)), (name, status, response.text)
    assert any(status == 503 for _, status, _, _ in load.answers)


def test_a_hung_redis_is_503_within_the_command_timeout(outage: Outage) -> None:
    """Redis that accepts connections but never answers (SIGSTOP): requests give up after
    STREAMQ_REDIS_COMMAND_TIMEOUT (1 s), not after the retries of several socket timeouts."""
    url = outage.url
    assert outage.redis.proc is not None
    with httpx.Client(timeout=30) as client:
        job = client.post(f"{url}/v1/jobs", json={"prompt": "hi", "max_tokens": 2}).json()
        os.kill(outage.redis.proc.pid, signal.SIGSTOP)
        try:
            for method, path in (("GET", f"/v1/jobs/{job['id']}"), ("POST", "/v1/jobs"), ("GET", "/readyz")):
                started = time.monotonic()
                response = client.request(method, url + path, json={"prompt": "hi", "max_tokens": 2})
                assert time.monotonic() - started < QUICK, (method, path)
                assert response.status_code == 503, response.text
                if path != "/readyz":
                    assert_unavailable(response)
            # The worker gives up on replies that never come too (as from a primary whose host
            # died without closing its connections): it says so and retries, instead of waiting
            # for as long as TCP takes to notice (its connections had no read timeout).
            worker = outage.services[0]
            wait_for(lambda: "Timeout reading from" in worker.log(), 60, "the worker to give up on Redis")
        finally:
            os.kill(outage.redis.proc.pid, signal.SIGCONT)
        wait_for(lambda: client.get(f"{url}/readyz").status_code == 200, 30, "the front to be ready again")
        assert follow(client, url, job["id"])[-1].event == "done"
