"""Real processes for end-to-end tests: a private redis-server, fronts under uvicorn, workers."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import httpx
import redis

from shared.launcher import free_port, start_private_redis

ROOT = Path(__file__).resolve().parent.parent


class RedisServer:
    """A private redis-server on a free port, in its own temporary folder."""

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="streamq-test-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc, _ = start_private_redis(Path(self.dir), self.port)

    def client(self, **kwargs: object) -> redis.Redis:
        return redis.Redis.from_url(self.url, **kwargs)  # type: ignore[arg-type]

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Service:
    """A child process of the suite (a front or a worker), with its log in a file."""

    def __init__(self, args: list[str], env: Mapping[str, str], name: str, logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args],
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def start_front(
    env: Mapping[str, str],
    logdir: Path,
    name: str = "front",
    log_level: str = "warning",
    port: int | None = None,
) -> tuple[Service, str]:
    """A front on a free port (or on ``port``: a front restarted where its clients expect it)."""
    port = port or free_port()
    service = Service(["api", "--port", str(port), "--log-level", log_level], env, name, logdir)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(url) or not service.alive(), 60, f"{name} to listen")
    assert service.alive(), service.log()
    return service, url


def start_worker(env: Mapping[str, str], logdir: Path, model: str, name: str) -> Service:
    return Service(["worker", "--model", model, "--name", name], env, name, logdir)


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def wait_for(condition: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_workers(url: str, count: int, timeout: float = 90) -> None:
    def enough() -> bool:
        r = httpx.get(f"{url}/readyz", timeout=2)
        return r.status_code == 200 and sum(r.json()["models"].values()) >= count

    wait_for(enough, timeout, f"{count} live worker(s)")


def start_synthetic_worker(
    env: Mapping[str, str],
    logdir: Path,
    served_name: str,
    name: str,
    tokens_per_second: float = 50,
    slots: int = 1,
) -> Service:
    """A worker with no model: each job "generates" max_tokens words at tokens_per_second."""
    args = ["worker", "--backend", "synthetic", "--tokens-per-second", str(tokens_per_second)]
    args += ["--slots", str(slots), "--served-name", served_name, "--name", name]
    return Service(args, env, name, logdir)


def restart_front_soon(
    env: Mapping[str, str], logdir: Path, name: str, url: str, started: list[Service]
) -> threading.Thread:
    """Start a front again where ``url`` points, in a thread (its clients retry meanwhile); the new
    front is appended to ``started``. Join the thread before using it."""
    port = urlparse(url).port

    def start() -> None:
        started.append(start_front(env, logdir, name, port=port)[0])

    thread = threading.Thread(target=start, name=f"restart {name}")
    thread.start()
    return thread
