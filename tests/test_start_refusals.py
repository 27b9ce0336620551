"""A process that cannot start says why in one line, before it does anything: a setting or option
that is not valid (exit 2, "streamq: refusing to start: ..."), a model folder without a model
or a tokenizer, no Redis primary to find (exit 1, "streamq worker: cannot ...")."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from streamq.processes import free_port
from tests.conftest import Stack
from tests.processes import ROOT, clean_env

pytestmark = pytest.mark.e2e


def _streamq(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``streamq ARGS`` run to its end with ``env``: its exit status and what it printed."""
    command = [sys.executable, "-m", "streamq", *args]
    return subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)


def _refused(args: list[str], env: dict[str, str]) -> str:
    """The one line a process that refuses its settings says (exit 2, no traceback)."""
    done = _streamq(args, {**os.environ, **env})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("streamq: refusing to start: "), line
    return line


def test_a_setting_that_is_not_valid_stops_a_process_with_what_is_wrong_not_a_traceback() -> None:
    line = _refused(["worker", "--model", "x"], {"STREAMQ_SLOTS": "many", "STREAMQ_KV_CACHE_GIB": "-1"})
    ttl = _refused(["api"], {"STREAMQ_WORKER_TTL": "1"})  # workers beat every 2 s: models came and went
    assert "STREAMQ_WORKER_TTL: value error, must be at least twice STREAMQ_HEARTBEAT_INTERVAL" in ttl
    assert "(2 s here)" in ttl
    assert "give this process their STREAMQ_HEARTBEAT_INTERVAL too" in ttl
    assert "STREAMQ_SLOTS (--slots): input should be a valid integer" in line and "got 'many'" in line
    assert "STREAMQ_KV_CACHE_GIB: input should be greater than 0, got '-1'" in line
    # A check of several settings together says which, and no setting's value: no password leaks.
    secret = {"STREAMQ_REDIS_URL": "redis://:s3cret@db:6379/0", "STREAMQ_REDIS_WAIT_REPLICAS": "1"}
    secret["STREAMQ_REDIS_WAIT_MS"] = "999999"
    done = _streamq(["worker", "--model", "x"], {**os.environ, **secret})
    assert done.returncode == 2 and "s3cret" not in done.stderr, done.stderr
    assert "STREAMQ_REDIS_WAIT_MS must be shorter than STREAMQ_REDIS_COMMAND_TIMEOUT" in done.stderr


@pytest.mark.parametrize(
    ("setting", "value", "says"),
    [
        ("STREAMQ_REDIS_URL", "http://s3cret@nope", "not a Redis URL: Redis URL must specify one of"),
        ("STREAMQ_REDIS_URL", "redis://:s3cret@db:notaport/0", "Port could not be cast"),
        ("STREAMQ_REDIS_URL", "redis://:s3cret@db:6379/abc", "its database must be a number"),
        ("STREAMQ_LEASE_RENEW_SECONDS", "3", "at most half of STREAMQ_LEASE_SECONDS (5 s)"),
        # Redis trimmed a long answer's first events: a late reader got its tail as if whole.
        ("STREAMQ_STREAM_MAXLEN", "100", "must be at least STREAMQ_MAX_TOKENS_LIMIT + 64 (4160)"),
        # redis-py lets the URL's socket_timeout win over a blocking read's: streams were cut.
        (
            "STREAMQ_REDIS_URL",
            "redis://:s3cret@db:6379/0?socket_timeout=0.5",
            "set STREAMQ_REDIS_SOCKET_TIMEOUT",
        ),
        ("STREAMQ_REDIS_URL", "redis://:s3cret@db:6379/0?max_connections=5", "STREAMQ_REDIS_MAX_CONNECTIONS"),
        ("STREAMQ_REDIS_URL", "redis://:s3cret@db:6379/0?timeout=1", "STREAMQ_REDIS_POOL_TIMEOUT"),
        # Taken for a host named "redis://127.0.0.1": the process logged "No master found" each second.
        ("STREAMQ_REDIS_SENTINELS", "redis://127.0.0.1:26379", "a sentinel address is host:port"),
        ("STREAMQ_REDIS_SENTINELS", "a:1;b:2", "a sentinel address is host:port"),
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
    # A GPU by its index is a common spelling: the refusal says how a worker is given one GPU.
    gpu = _refused(["worker", "--model", "x"], {"STREAMQ_DEVICE": "cuda:1"})
    assert "pick the GPU with CUDA_VISIBLE_DEVICES=1 and STREAMQ_DEVICE=cuda" in gpu, gpu


def test_a_plain_rq_worker_without_a_model_says_so_in_one_line(stack: Stack) -> None:
    """It stopped with a traceback that told to pass --model, an option `rq worker` has not."""
    rq = Path(sys.executable).with_name("rq")
    command = [str(rq), "worker", "-w", "worker.rq_worker.StreamqWorker", "-c", "worker.rq_config", "--burst"]
    env = clean_env(STREAMQ_REDIS_URL=stack.redis.url, STREAMQ_METRICS_PORT="0")
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip() == "streamq: refusing to start: no model to serve: set STREAMQ_MODEL"


def test_a_worker_says_what_its_model_folder_or_engine_lacks(tmp_path: Path, stack: Stack) -> None:
    """An empty folder was refused with transformers' advice to install sentencepiece; a model
    without its tokenizer files loaded, and then refused every prompt as "no tokens"."""
    empty = tmp_path / "empty"
    empty.mkdir()
    no_tokenizer = tmp_path / "no-tokenizer"
    shutil.copytree(stack.model_dir, no_tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    # A model split over GPUs needs the vLLM engine: the transformers engine ran it on one device.
    split = {"STREAMQ_TENSOR_PARALLEL_SIZE": "2", "STREAMQ_ENGINE": "transformers"}
    for folder, says, env in (
        (empty, "the folder holds no model: it has no config.json", {}),
        (no_tokenizer, "no tokenizer", {}),
        (stack.model_dir, "split a model over GPUs on the vLLM engine (--engine vllm) only", split),
    ):
        done = _streamq(
            ["worker", "--model", str(folder)], clean_env(STREAMQ_REDIS_URL=stack.redis.url, **env)
        )
        assert done.returncode == 1, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"streamq worker: cannot serve {folder}: ") and says in last, last


def test_a_worker_with_no_sentinel_to_ask_says_so_in_words() -> None:
    """redis-py's "No master found" carried a kilobyte of its clients' repr: each sentinel's error
    is kept, not the repr."""
    sentinel = f"127.0.0.1:{free_port()}"
    done = _streamq(["worker", "--backend", "synthetic"], clean_env(STREAMQ_REDIS_SENTINELS=sentinel))
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "/streamq: No master found for 'streamq': Error 111 connecting to 127.0.0.1:" in last, last
    assert "Connection refused" in last and "redis.connection" not in last and len(last) < 300, last


def test_the_log_level_is_a_setting_of_every_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """STREAMQ_LOG_LEVEL was no setting (a worker always logged at info); a bad one is refused."""
    import logging

    from rq.logutils import setup_loghandlers

    from shared.settings import Settings
    from worker.worker_logging import configure_worker_logging

    monkeypatch.setenv("STREAMQ_LOG_LEVEL", "WARNING")
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    rq_logger = logging.getLogger("rq.worker")
    rq_before = (rq_logger.level, list(rq_logger.handlers), rq_logger.propagate)
    try:
        # RQ sets its loggers at info when imported (the dispatcher's RQ calls log through them
        # in `streamq worker` too); `rq worker` also gives them handlers of their own, before the
        # worker starts; then its start (StreamqWorker.bootstrap) gives RQ no level.
        setup_loghandlers("INFO", name="rq.worker")  # as `rq worker`'s command does
        configure_worker_logging(Settings(backend="synthetic"))
        assert root.level == logging.WARNING
        setup_loghandlers(None, name="rq.worker")  # as RQ's bootstrap does, given no level
        assert rq_logger.getEffectiveLevel() == logging.WARNING and not rq_logger.handlers
    finally:
        root.setLevel(before[0])
        root.handlers[:] = before[1]
        rq_logger.level, rq_logger.handlers[:], rq_logger.propagate = rq_before
    line = _refused(["worker", "--backend", "synthetic"], {"STREAMQ_LOG_LEVEL": "loud"})
    assert "STREAMQ_LOG_LEVEL: input should be 'critical', 'error', 'warning', 'info' or 'debug'" in line


def test_a_streamq_variable_that_names_no_setting_is_warned_of_with_the_one_it_likely_meant() -> None:
    """A misspelt setting was ignored in silence: STREAMQ_REDIS_SENTINAL left a process on the
    default Redis, not the sentinels. The client's own variables are not warned of."""
    env = {**os.environ, "STREAMQ_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    env |= {"STREAMQ_REDIS_SENTINAL": "10.0.0.1:26379", "STREAMQ_SLOT": "4", "STREAMQ_URL": "http://x"}
    done = _streamq(["status"], env)
    warned = [line for line in done.stderr.splitlines() if line.startswith("streamq: warning: ")]
    assert warned == [
        "streamq: warning: STREAMQ_REDIS_SENTINAL is not a setting: it is ignored "
        "(did you mean STREAMQ_REDIS_SENTINELS?)",
        "streamq: warning: STREAMQ_SLOT is not a setting: it is ignored (did you mean STREAMQ_SLOTS?)",
    ], done.stderr
