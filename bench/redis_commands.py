"""Redis commands per job: what one job costs Redis, read off ``INFO commandstats`` around a run.

A private Redis, one front and one synthetic worker (4 slots). First the idle system alone for
a few seconds (heartbeats, idle slots' waits, the janitor): commands per second. Then short jobs
(2 tokens) and long ones (``LONG`` tokens at ``RATE`` tokens/s, so the publisher coalesces as it
does for a real model), each submitted with POST /v1/jobs and followed over SSE to its end, a
few at a time. A job's cost is the run's commands less the idle rate over the run's time, over
the jobs; a token's is the long jobs' cost less the short ones', over the extra tokens. Commands
that scripts run count (Redis counts them as commands), and so does each script call itself.
"""

from __future__ import annotations

import asyncio
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import redis

from bench.http_client import post_json, stream_lines
from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_workers

HOST = "127.0.0.1"
SHORT = 2
LONG = 102
RATE = 200  # tokens/s of the synthetic worker: 5 ms a token, coalesced by the publisher
AT_ONCE = 4
IDLE_SECONDS = 10.0
TARGET = 30
NOT_COUNTED = {"info", "config|resetstat", "config"}


def _stats(r: redis.Redis) -> Counter[str]:
    found: Counter[str] = Counter()
    for name, stat in r.info("commandstats").items():
        command = name.removeprefix("cmdstat_")
        if command not in NOT_COUNTED:
            found[command] = int(stat["calls"])
    return found


async def _job(port: int, tokens: int) -> None:
    body = {"prompt": "hi", "max_tokens": tokens, "model": "synthetic"}
    status, job = await post_json(HOST, port, "/v1/jobs", body)
    if status != 202:
        raise RuntimeError(f"POST /v1/jobs: HTTP {status}: {job}")
    async for _now, line in stream_lines(HOST, port, "GET", f"/v1/jobs/{job['id']}/events"):
        if line in ("event: done", "event: error", "event: canceled"):
            if line != "event: done":
                raise RuntimeError(f"job {job['id']}: {line}")
            return
    raise RuntimeError(f"job {job['id']}: the stream ended without a final event")


def _run_jobs(port: int, jobs: int, tokens: int) -> None:
    async def run() -> None:
        gate = asyncio.Semaphore(AT_ONCE)

        async def one() -> None:
            async with gate:
                await _job(port, tokens)

        await asyncio.gather(*(one() for _ in range(jobs)))

    asyncio.run(run())


def _cpu(r: redis.Redis) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def _measure(r: redis.Redis, work: object) -> tuple[Counter[str], float, float, int]:
    """The commands Redis ran during ``work``, its wall time, Redis's CPU seconds, and how much
    more memory Redis holds after it (bytes)."""
    r.config_resetstat()
    cpu, memory = _cpu(r), int(r.info("memory")["used_memory"])
    start = time.monotonic()
    work()  # type: ignore[operator]
    elapsed = time.monotonic() - start
    return _stats(r), elapsed, _cpu(r) - cpu, int(r.info("memory")["used_memory"]) - memory


def measure(workdir: Path, jobs: int) -> dict[str, object]:
    server = RedisServer()
    env = {"STREAMQ_REDIS_URL": server.url, "STREAMQ_LOG_LEVEL": "WARNING"}
    services: list[Service] = []
    try:
        services.append(
            start_synthetic_worker(env, workdir, "synthetic", "commands-worker", RATE, slots=AT_ONCE)
        )
        front, url = start_front(env, workdir, "commands-front")
        services.append(front)
        wait_workers(url, 1, timeout=60)
        port = int(url.rsplit(":", 1)[1])
        _run_jobs(port, 8, SHORT)  # warm-up: scripts loaded, connections open
        r = redis.Redis.from_url(server.url, decode_responses=True)
        idle, idle_s, idle_cpu, _ = _measure(r, lambda: time.sleep(IDLE_SECONDS))
        short, short_s, short_cpu, short_memory = _measure(r, lambda: _run_jobs(port, jobs, SHORT))
        long_jobs = max(AT_ONCE, jobs // 4)
        long, long_s, long_cpu, _ = _measure(r, lambda: _run_jobs(port, long_jobs, LONG))
        r.close()
    finally:
        for service in reversed(services):
            service.stop()
        server.close()
    idle_rate = {c: n / idle_s for c, n in idle.items()}

    def per_job(run: Counter[str], seconds: float, count: int) -> dict[str, float]:
        return {c: max(0.0, (run[c] - idle_rate.get(c, 0.0) * seconds) / count) for c in run}

    idle_cpu_rate = idle_cpu / idle_s
    short_job_cpu = (short_cpu - idle_cpu_rate * short_s) / jobs
    long_job_cpu = (long_cpu - idle_cpu_rate * long_s) / long_jobs
    return {
        "jobs": jobs,
        "long_jobs": long_jobs,
        "cpu_per_job": short_job_cpu,
        "cpu_per_token": (long_job_cpu - short_job_cpu) / (LONG - SHORT),
        "memory_per_job": short_memory / jobs,
        "idle": idle_rate,
        "short": per_job(short, short_s, jobs),
        "long": per_job(long, long_s, long_jobs),
    }


def run_commands(workdir: Path, jobs: int = 200) -> None:
    m = measure(workdir, jobs)
    idle: dict[str, float] = m["idle"]  # type: ignore[assignment]
    short: dict[str, float] = m["short"]  # type: ignore[assignment]
    long: dict[str, float] = m["long"]  # type: ignore[assignment]
    per_job = sum(short.values())
    per_token = (sum(long.values()) - per_job) / (LONG - SHORT)
    print(
        f"\nRedis commands per job — {platform.platform()}, {os.cpu_count()} cores\n"
        f"command: {' '.join(['python -m bench', *sys.argv[1:]])}\n"
        f"one front, one synthetic worker ({AT_ONCE} slots, {RATE} tokens/s); {m['jobs']} jobs of {SHORT} "
        f"tokens and {m['long_jobs']} of {LONG}, {AT_ONCE} at a time, each submitted and followed over SSE; "
        "INFO commandstats (commands run by scripts included), less the idle rate"
    )
    print(f"{'measure':<52}{'value':>10}{'target':>9}   verdict")
    verdict = "met" if per_job <= TARGET else "MISSED"
    print(f"{'commands per short job':<52}{per_job:>10.1f}{'≤ ' + str(TARGET):>9}   {verdict}")
    print(f"{'commands per extra token (coalesced)':<52}{per_token:>10.2f}")
    print(f"{'idle commands per second (front + worker)':<52}{sum(idle.values()):>10.1f}")
    cpu_job, cpu_token = float(m["cpu_per_job"]), float(m["cpu_per_token"])  # type: ignore[arg-type]
    print(f"{'Redis CPU per short job (µs)':<52}{cpu_job * 1e6:>10.0f}")
    print(f"{'Redis CPU per extra token (µs)':<52}{cpu_token * 1e6:>10.1f}")
    memory = float(m["memory_per_job"])  # type: ignore[arg-type]
    print(f"{'Redis memory kept per ended short job (KiB)':<52}{memory / 1024:>10.1f}")
    top = sorted(short.items(), key=lambda kv: -kv[1])
    print("short job, by command: " + ", ".join(f"{c} {n:.1f}" for c, n in top if n >= 0.05))
    top_idle = sorted(idle.items(), key=lambda kv: -kv[1])
    print("idle, per second: " + ", ".join(f"{c} {n:.2f}" for c, n in top_idle if n >= 0.01))
