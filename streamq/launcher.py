"""``streamq up``: the whole stack on one machine, in one command.

Starts a private Redis (unless STREAMQ_REDIS_URL is set; see streamq/redis_server.py), the front and N workers
as child processes, waits until /readyz says ready, prints how to use it, and on Ctrl-C or
SIGTERM stops every child and removes the private Redis.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import redis

from shared import keys
from shared.cli_options import with_options
from shared.parent_death import die_with_parent
from shared.ports import port_in_use
from shared.redis_connect import RedisTarget, redacted
from shared.settings import Settings
from shared.settings_loading import unknown_variables
from streamq.processes import streamq_command
from streamq.redis_server import start_private_redis

TINY_MODEL_NAME = "streamq-tiny"


def ensure_tiny_model(cache: Path, shape: str = "tiny") -> Path:
    """The demo model, built on first use (atomically: a half-built folder is never used)."""
    target = cache / (TINY_MODEL_NAME if shape == "tiny" else f"{TINY_MODEL_NAME}-{shape}")
    if (target / "config.json").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    print(f"building the tiny demo model into {target} (first run only)...", flush=True)
    building = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache))
    subprocess.run(
        streamq_command("make-tiny-model", str(building), "--shape", shape),
        check=True,
        start_new_session=True,
    )
    shutil.rmtree(target, ignore_errors=True)
    building.rename(target)
    return target


def _served(url: str) -> list[str] | None:
    """The names the stack serves its models under, once ``/readyz`` says it is ready."""
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:
            if response.status != 200:
                return None
            return sorted(json.loads(response.read()).get("models") or {})
    except (urllib.error.URLError, OSError, ValueError):
        return None


def worker_cores(workers: int, threads: int | None = None, parallel: bool = False) -> list[dict[str, str]]:
    """Each worker's own share of this process's cores (``threads`` at most) for vLLM's CPU
    threads (its ``VLLM_CPU_OMP_THREADS_BIND``; the transformers engine does not read it): by
    default each binds to the first cores it may use, so every worker would take the same ones.
    Nothing where the user set the variable, or for workers with tensor or pipeline parallelism
    (``parallel``: vLLM then wants one list of cores per rank, and makes them itself)."""
    if os.environ.get("VLLM_CPU_OMP_THREADS_BIND") or parallel:
        return [{} for _ in range(workers)]
    cores = sorted(os.sched_getaffinity(0))
    share = max(1, len(cores) // max(1, workers))
    share = min(share, threads or share)
    bound = []
    for i in range(workers):
        own = cores[i * share : (i + 1) * share] or [cores[i % len(cores)]]  # more workers than cores
        bound.append({"VLLM_CPU_OMP_THREADS_BIND": ",".join(map(str, own))})
    return bound


def _spawn(args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Own session: Ctrl-C in the terminal reaches only the launcher, which then stops the
    # children in order (front, workers, Redis) instead of all at once.
    return subprocess.Popen(
        streamq_command(*args), env=env, start_new_session=True, preexec_fn=die_with_parent
    )


def _stop_all(
    procs: list[subprocess.Popen[bytes]], grace: float, hurry: dict[str, int], signals: int = 1
) -> None:
    """SIGTERM each process (``signals`` times, ``grace`` seconds apart: a second SIGTERM is RQ's
    cold shutdown), then SIGKILL what is left. A second Ctrl-C (``hurry``) cuts the waits short."""
    for round_ in range(signals + 1):
        alive = [p for p in procs if p.poll() is None]
        if not alive:
            return
        for proc in alive:
            if round_ < signals:
                proc.send_signal(signal.SIGTERM)
            else:
                proc.kill()
        deadline = time.monotonic() + (grace if round_ < signals else 10)
        while any(p.poll() is None for p in alive) and time.monotonic() < deadline:
            if hurry["signal"] > 1 and round_ < signals:
                break
            time.sleep(0.05)


MAX_RESTARTS = 3  # a worker restarted this many times within a minute stops the stack at its next exit


@dataclass
class _Worker:
    """One worker process ``up`` keeps running, under a name of its own in Redis for each start."""

    name: str
    env: dict[str, str]
    proc: subprocess.Popen[bytes]
    came_up: bool = False  # its start showed in the directory of live workers
    restarts: list[float] = field(default_factory=list)  # when it was started again, within a minute


class _Workers:
    """The stack's workers: started, watched, and started again when one dies while serving."""

    def __init__(self, model_path: str, envs: list[dict[str, str]]) -> None:
        self.model_path = model_path
        names = [f"up{os.getpid()}-{i + 1}" for i in range(len(envs))]
        self.all = [_Worker(name, env, self._spawn(name, env)) for name, env in zip(names, envs, strict=True)]

    def _spawn(self, name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        return _spawn(["worker", "--model", self.model_path, "--name", name], env)

    def note_live(self, directory: redis.Redis) -> None:
        """Mark the workers whose start shows in Redis's directory of live workers (a worker that
        dies before that never came up: it is not started again)."""
        waiting = [w for w in self.all if not w.came_up]
        if not waiting:
            return
        try:
            pipe = directory.pipeline(transaction=False)
            for worker in waiting:
                pipe.zscore(keys.WORKERS, worker.name)
            for worker, score in zip(waiting, pipe.execute(), strict=True):
                worker.came_up = score is not None
        except redis.RedisError:
            pass  # looked at again on the next round

    def restart_exited(self) -> bool:
        """Start again each worker that died while serving (killed, out of memory: its jobs go on
        on the others, or on the one started in its place, from where they were). False where one
        that never came up, or keeps dying, exited: the stack stops."""
        for i, worker in enumerate(self.all, start=1):
            if worker.proc.poll() is None:
                continue
            now = time.monotonic()
            recent = [t for t in worker.restarts if now - t < 60]
            if not worker.came_up or len(recent) >= MAX_RESTARTS:
                print(
                    f"streamq up: a child process exited (code {worker.proc.returncode}); stopping",
                    file=sys.stderr,
                )
                return False
            print(
                f"streamq up: worker {i} exited (code {worker.proc.returncode}); starting another",
                file=sys.stderr,
            )
            worker.restarts = [*recent, now]
            worker.name = f"{worker.name.split('.')[0]}.{len(worker.restarts)}.{int(now)}"
            worker.came_up = False
            worker.proc = self._spawn(worker.name, worker.env)
        return True

    def procs(self) -> list[subprocess.Popen[bytes]]:
        return [w.proc for w in self.all]


def _children_env(settings: Settings, redis_url: str, workers: int) -> dict[str, str]:
    """The environment of the front and the workers: this one, less the variables that name no
    setting (said once, here, not again by each process it starts), plus the stack's own."""
    unknown = set(unknown_variables(os.environ))
    env = {k: v for k, v in os.environ.items() if k not in unknown}
    env |= {"STREAMQ_REDIS_URL": redis_url, "STREAMQ_DEVICE": settings.device}
    env["STREAMQ_DTYPE"] = settings.dtype
    env["STREAMQ_ENGINE"] = settings.engine
    env["STREAMQ_INSECURE"] = "1" if settings.insecure else "0"
    if settings.torch_threads is None:
        env["STREAMQ_TORCH_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, workers)))
    return env


def _redis_gone(redis_proc: subprocess.Popen[bytes] | None) -> bool:
    if redis_proc is None or redis_proc.poll() is None:
        return False
    # Its private Redis held every job, queue and stream: they are gone with it, and nothing here
    # could come back to a Redis started anew. Stop, and say so.
    print(
        f"streamq up: its private Redis exited (code {redis_proc.returncode}), and every "
        "job, queue and stream with it; stopping (start `streamq up` again)",
        file=sys.stderr,
    )
    return True


def run_up(settings: Settings, host: str, port: int, model: str | None, workers: int) -> int:
    if workers < 1:
        print("streamq up: --workers must be at least 1", file=sys.stderr)
        return 2
    if port_in_use(host, port):
        print(f"streamq up: port {port} on {host} is in use; choose another with --port", file=sys.stderr)
        return 2
    stop = {"signal": 0}  # how many stop signals came: the first stops gently, a second at once

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop["signal"] += 1

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    workdir = Path(tempfile.mkdtemp(prefix="streamq-up-"))
    redis_proc: subprocess.Popen[bytes] | None = None
    front: list[subprocess.Popen[bytes]] = []
    pool: _Workers | None = None
    try:
        redis_url = settings.redis_url_or_default()
        if settings.redis_url is None and not settings.sentinel_addresses():
            try:
                redis_proc, redis_url = start_private_redis(workdir)
            except FileNotFoundError as exc:
                print(exc, file=sys.stderr)
                return 2
        # vLLM's CPU attention needs heads of 32+ dimensions: its demo model has 64.
        shape = "tiny-hd64" if settings.engine == "vllm" else "tiny"
        model_path = model or str(ensure_tiny_model(settings.cache_path(), shape))
        env = _children_env(settings, redis_url, workers)
        front.append(_spawn(["api", "--host", host, "--port", str(port)], env))
        parallel = settings.tensor_parallel_size > 1 or settings.pipeline_parallel_size > 1
        pool = _Workers(
            model_path, [env | cores for cores in worker_cores(workers, settings.torch_threads, parallel)]
        )
        directory = RedisTarget.of(with_options(settings, redis_url=redis_url)).client(socket_timeout=2)
        url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
        announced = hinted = False
        started = time.monotonic()
        while not stop["signal"]:
            if _redis_gone(redis_proc):
                stop["signal"] = 2  # nothing is left to hand back: the workers need no drain
                return 1
            pool.note_live(directory)
            if front[0].poll() is not None:
                print(
                    f"streamq up: a child process exited (code {front[0].returncode}); stopping",
                    file=sys.stderr,
                )
                return 1
            if not pool.restart_exited():
                return 1
            if not announced and (served := _served(url)) is not None:
                keyed = bool(settings.api_keys.get_secret_value() or settings.api_keys_file)
                model = f"{', '.join(served)} (from {model_path})" if served else model_path
                _print_banner(url, model, workers, redis_url, redis_proc is not None, keyed)
                announced = True
            elif not announced and not hinted and time.monotonic() - started > 60:
                print(f"streamq up: still waiting for {url}/readyz (loading the model?)", file=sys.stderr)
                hinted = True
            time.sleep(0.25)
        print("\nstreamq up: stopping...", flush=True)
        return 0
    finally:
        # The front first, with its own grace and then some: it ends its open requests itself
        # a second before that grace runs out, and its clients resume elsewhere.
        _stop_all(front, grace=settings.shutdown_grace + 5, hurry=stop)
        # Then the workers: a warm stop lets a running job finish; a second SIGTERM (RQ's cold
        # stop) fails it with a reason rather than leaving it "running".
        _stop_all(pool.procs() if pool else [], grace=15, hurry=stop, signals=2)
        if redis_proc is not None:
            _stop_all([redis_proc], grace=5, hurry=stop)
        shutil.rmtree(workdir, ignore_errors=True)


def _print_banner(url: str, model: str, workers: int, redis_url: str, private: bool, keyed: bool) -> None:
    where = "private, removed on exit" if private else "shared"
    # With API keys the examples send one, from $STREAMQ_API_KEY (the banner never shows a key).
    auth = ' -H "Authorization: Bearer $STREAMQ_API_KEY"' if keyed else ""
    key_note = "\nAPI keys are on: set STREAMQ_API_KEY to one of them for these examples.\n" if keyed else ""
    # A shared Redis's URL is the caller's STREAMQ_REDIS_URL already (and may hold a password).
    status = f"STREAMQ_REDIS_URL={redis_url} streamq status" if private else "streamq status"
    print(
        f"""
streamq is up at {url}
  model:   {model}  ({workers} worker{"s" if workers != 1 else ""})
  redis:   {redacted(redis_url)}  ({where})
  docs:    {url}/docs
{key_note}
Stream an answer (job API, Server-Sent Events):
  JOB=$(curl -s {url}/v1/jobs{auth} -H 'Content-Type: application/json' \\
        -d '{{"messages": [{{"role": "user", "content": "Hello!"}}], "max_tokens": 64}}' \\
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  curl -N {url}/v1/jobs/$JOB/events{auth}

The seed's streaming API (each chunk is <^> + the answer so far):
  curl -N {url}/stream{auth} -H 'Content-Type: application/json' -d '{{"prompt": "Hello!", "history": []}}'

Queues, workers and jobs (this stack's Redis):
  {status}

Press Ctrl-C to stop.
""",
        flush=True,
    )
