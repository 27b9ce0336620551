"""Fronts and workers as child processes (``python -m streamq ...``), each with its log in a
file, and waits for them: the tests' fixtures and the benchmarks start them alike."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx

from streamq.processes import free_port, streamq_command


class Service:
    """A child process (a front or a worker), with its log in a file."""

    def __init__(
        self, args: list[str], env: Mapping[str, str], name: str, logdir: Path, cwd: Path | None = None
    ) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            streamq_command(*args),
            env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            cwd=cwd,
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
    extra: Sequence[str] = (),
) -> tuple[Service, str]:
    """A front on a free port (or on ``port``: a front restarted where its clients expect it),
    with ``extra`` options (``--workers 2``)."""
    port = port or free_port()
    service = Service(["api", "--port", str(port), "--log-level", log_level, *extra], env, name, logdir)
    url = f"http://127.0.0.1:{port}"
    wait_for(lambda: _answers(url) or not service.alive(), 60, f"{name} to listen")
    assert service.alive(), service.log()
    return service, url


def start_worker(env: Mapping[str, str], logdir: Path, model: str, name: str) -> Service:
    return Service(["worker", "--model", model, "--name", name], env, name, logdir)


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


def _answers(url: str) -> bool:
    try:
        httpx.get(f"{url}/healthz", timeout=1)
        return True
    except httpx.HTTPError:
        return False


def wait_for(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


def wait_workers(url: str, count: int, timeout: float = 90) -> None:
    def enough() -> bool:
        r = httpx.get(f"{url}/readyz", timeout=2)
        return r.status_code == 200 and sum(r.json()["models"].values()) >= count

    wait_for(enough, timeout, f"{count} live worker(s)")
