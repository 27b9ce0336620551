"""`streamq api --workers N`: one front of several processes on one port, as a user sees it.

Real processes over real HTTP: a private Redis, a synthetic worker, and a front started with
``--workers 2`` (uvicorn's parent process and its two serving children). Which child serves a
connection is read from the children's own sockets (psutil), so the tests know that work crossed
processes rather than hope it did.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest
from prometheus_client.multiprocess import MultiProcessCollector

from harness.redis_server import RedisServer
from harness.services import Service, _answers, start_synthetic_worker, wait_for, wait_workers
from streamq.processes import free_port
from tests.processes import ROOT
from tests.sse import SSE, events_to_final, follow, read_events, text_of

pytestmark = pytest.mark.e2e

MODEL = "synth-procs"
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
BURST = 20


def serving_children(parent: int) -> list[psutil.Process]:
    """uvicorn's serving processes under ``parent`` (not multiprocessing's helpers)."""
    children = psutil.Process(parent).children()
    return [c for c in children if "resource_tracker" not in " ".join(c.cmdline())]


def serving_pid(children: list[psutil.Process], client_port: int) -> int:
    """The child holding the server side of our connection from ``client_port``."""
    for child in children:
        for conn in child.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client_port:
                return child.pid
    raise AssertionError(f"no serving process holds the connection from port {client_port}")


def client_port(response: httpx.Response) -> int:
    return int(response.extensions["network_stream"].get_extra_info("client_addr")[1])


@dataclass
class Front:
    """A front of several processes: its Service (uvicorn's parent), URL and serving children."""

    service: Service
    url: str
    children: list[psutil.Process]
    submitted: int = 0  # jobs this module submitted through it
    served_by: dict[int, int] = field(default_factory=dict)  # child pid → submits it served

    def metrics_dir(self) -> Path:
        """The directory the front made for its processes' counters (read from a child's env)."""
        return Path(self.children[0].environ()[MULTIPROC_ENV])

    def submit(self, max_tokens: int = 8) -> str:
        """One job, over a new connection; counts which child took it."""
        body = {"model": MODEL, "prompt": "go", "max_tokens": max_tokens}
        with (
            httpx.Client(base_url=self.url, timeout=10) as http,
            http.stream("POST", "/v1/jobs", json=body) as response,
        ):
            pid = serving_pid(self.children, client_port(response))
            response.read()
            assert response.status_code == 202, response.text
        self.submitted += 1
        self.served_by[pid] = self.served_by.get(pid, 0) + 1
        return str(response.json()["id"])


def start_multi_front(env: dict[str, str], logdir: Path, name: str, *args: str) -> Front:
    port = free_port()
    argv = ["api", "--port", str(port), "--log-level", "warning", "--workers", "2", *args]
    service = Service(argv, env, name, logdir)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(url) or not service.alive(), 90, f"{name} to listen")
    assert service.alive(), service.log()
    wait_for(lambda: len(serving_children(service.proc.pid)) == 2, 60, "two serving processes")
    return Front(service, url, serving_children(service.proc.pid))


@dataclass
class Deployment:
    redis: RedisServer
    env: dict[str, str]
    logdir: Path
    front: Front


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    assert MULTIPROC_ENV not in os.environ, "the tests need the front to make its own directory"
    logdir = tmp_path_factory.mktemp("procs-logs")
    redis_server = RedisServer()
    env = {"STREAMQ_REDIS_URL": redis_server.url, "STREAMQ_PING_INTERVAL": "0.5"}
    started: list[Service] = []
    try:
        started.append(start_synthetic_worker(env, logdir, MODEL, "procs-synth", 40, slots=8))
        front = start_multi_front(env, logdir, "procs-front")
        started.append(front.service)
        wait_workers(front.url, 1)
        yield Deployment(redis_server, env, logdir, front)
    finally:
        for service in started:
            service.stop()
        redis_server.close()


def test_two_processes_serve_a_burst_of_jobs_to_the_end(deployment: Deployment) -> None:
    front = deployment.front
    assert len(front.children) == 2
    assert all(c.is_running() for c in front.children)
    ids = [front.submit() for _ in range(BURST)]
    with httpx.Client(timeout=30) as http:
        for job_id in ids:
            events = follow(http, front.url, job_id)
            assert events[-1].event == "done", events[-1]
            job = http.get(f"{front.url}/v1/jobs/{job_id}").json()
            assert job["status"] == "finished"
            assert text_of(events) == job["text"] != ""
    # Both processes took submits: the burst really was shared (new connection each time).
    assert sorted(front.served_by) == sorted(c.pid for c in front.children), front.served_by


def test_metrics_count_every_submit_whichever_process_served_it(deployment: Deployment) -> None:
    front = deployment.front
    for _ in range(BURST):
        front.submit()
    assert len(front.served_by) == 2, front.served_by
    answered_by = set()
    for _ in range(8):
        with (
            httpx.Client(timeout=10) as http,
            http.stream("GET", f"{front.url}/metrics") as response,
        ):
            answered_by.add(serving_pid(front.children, client_port(response)))
            text = response.read().decode()
        assert response.status_code == 200, text
        line = f'streamq_jobs_submitted_total{{model="{MODEL}"}} {float(front.submitted)}'
        assert line in text.splitlines(), text
        assert 'streamq_workers{model="synth-procs"} 1.0' in text  # the deployment's gauges too
    # Each process's own counter file holds what it served; /metrics is their sum.
    for child in front.children:
        own = MultiProcessCollector.merge([str(front.metrics_dir() / f"counter_{child.pid}.db")])
        counted = sum(s.value for m in own for s in m.samples if s.name == "streamq_jobs_submitted_total")
        assert counted == front.served_by[child.pid], (child.pid, front.served_by)
    print(f"submits per process {front.served_by}; /metrics answered by {sorted(answered_by)}")


def _stream_on_other_process(front: Front, job_id: str, last_id: str, not_pid: int) -> tuple[int, list[SSE]]:
    """Resume the job's events after ``last_id`` on a new connection, until one is served by
    another process than ``not_pid`` (the accept queue is shared: a few tries at most)."""
    for _ in range(30):
        with (
            httpx.Client(timeout=30) as http,
            http.stream(
                "GET", f"{front.url}/v1/jobs/{job_id}/events", headers={"Last-Event-ID": last_id}
            ) as response,
        ):
            assert response.status_code == 200
            pid = serving_pid(front.children, client_port(response))
            if pid == not_pid:
                continue  # nothing read: close it and connect again
            return pid, events_to_final(response)
    raise AssertionError(f"30 connections in a row were served by process {not_pid}")


def test_a_stream_resumed_on_another_process_has_no_gap_and_no_repeat(deployment: Deployment) -> None:
    front = deployment.front
    job_id = front.submit(max_tokens=80)  # 2 s at 40 words a second
    first: list[SSE] = []
    with (
        httpx.Client(timeout=30) as http,
        http.stream("GET", f"{front.url}/v1/jobs/{job_id}/events") as response,
    ):
        first_pid = serving_pid(front.children, client_port(response))
        for event in read_events(response):
            if event is not None:
                first.append(event)
            if sum(e.event == "delta" for e in first) == 20:
                break
    last_id = first[-1].id
    assert last_id is not None
    other_pid, rest = _stream_on_other_process(front, job_id, last_id, first_pid)
    assert other_pid != first_pid
    assert rest[-1].event == "done", rest[-1]
    ids = [e.id for e in first + rest]
    assert len(set(ids)) == len(ids), "an event came twice"
    assert ids == sorted(ids, key=lambda i: tuple(int(p) for p in str(i).split("-")))
    assert rest[0].id != last_id
    job = httpx.get(f"{front.url}/v1/jobs/{job_id}", timeout=10).json()
    assert job["status"] == "finished"
    assert len(job["text"].split()) == 80
    assert text_of(first) + text_of(rest) == job["text"]  # no gap, no repeat
    assert text_of(first) and text_of(rest)


def test_an_open_insecure_front_stops_whole_and_leaves_no_metrics_dir(
    deployment: Deployment,
) -> None:
    """On 0.0.0.0 with --insecure (every process serves without keys); SIGTERM to uvicorn's
    parent stops both children and removes the front's temporary metrics directory."""
    front = start_multi_front(
        deployment.env, deployment.logdir, "procs-open", "--host", "0.0.0.0", "--insecure"
    )
    try:
        metrics_dir = front.metrics_dir()
        assert metrics_dir.is_dir()
        assert metrics_dir.name.startswith("streamq-front-metrics-")
        ids = [front.submit() for _ in range(6)]
        with httpx.Client(timeout=30) as http:
            assert all(follow(http, front.url, i)[-1].event == "done" for i in ids)
        started = time.monotonic()
        front.service.proc.send_signal(signal.SIGTERM)
        rc = front.service.proc.wait(timeout=30)
        print(f"front stopped in {time.monotonic() - started:.1f}s (exit code {rc})")
        assert rc == 0, front.service.log()
        assert not metrics_dir.exists()
        wait_for(lambda: not any(c.is_running() for c in front.children), 10, "the children to go")
        assert "Traceback" not in front.service.log(), front.service.log()
    finally:
        front.service.stop(signal.SIGKILL)
        for child in front.children:
            if child.is_running():
                child.kill()


def test_a_killed_front_leaves_no_process_serving_its_port(deployment: Deployment) -> None:
    """SIGKILL to uvicorn's parent (OOM killer, kill -9): its children stop too, so the port is
    free for the front's restart instead of served on by orphans."""
    front = start_multi_front(deployment.env, deployment.logdir, "procs-killed")
    metrics_dir = front.metrics_dir()
    try:
        front.service.proc.kill()
        front.service.proc.wait(timeout=10)
        wait_for(lambda: not any(c.is_running() for c in front.children), 20, "the orphans to stop")
        assert not _answers(front.url)
    finally:
        front.service.stop()
        for child in front.children:
            if child.is_running():
                child.kill()
        shutil.rmtree(metrics_dir, ignore_errors=True)  # a killed parent cannot remove it


def _refusal(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("STREAMQ_")}
    return subprocess.run(
        [sys.executable, "-m", "streamq", "api", "--port", str(free_port()), *args],
        env={**base, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "env", "said"),
    [
        ((), {"STREAMQ_API_WORKERS": "0"}, "greater than or equal to 1, got '0'"),
        (("--workers", "0"), {}, "greater than or equal to 1, got 0"),
        (("--workers", "65"), {}, "less than or equal to 64, got 65"),
        ((), {"STREAMQ_API_WORKERS": "two"}, "valid integer"),
    ],
)
def test_a_bad_number_of_processes_is_refused_in_one_line(
    args: tuple[str, ...], env: dict[str, str], said: str
) -> None:
    done = _refusal(*args, **env)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("streamq: refusing to start: STREAMQ_API_WORKERS (--workers): ")
    assert said in lines[0]
    assert done.stdout == ""


def test_metrics_dir_is_the_operators_when_given(tmp_path: Path, deployment: Deployment) -> None:
    """A PROMETHEUS_MULTIPROC_DIR already set is used as is, and left in place on stop."""
    given = tmp_path / "prom"
    given.mkdir()
    front = start_multi_front({**deployment.env, MULTIPROC_ENV: str(given)}, deployment.logdir, "procs-given")
    try:
        assert front.metrics_dir() == given
        front.submit()
        assert any(given.glob("counter_*.db"))
    finally:
        front.service.stop()
    assert given.is_dir()
