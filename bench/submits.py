"""Submits: how many jobs one front takes per second, and how long each POST takes, as concurrency
rises. A private Redis, one synthetic worker, and a front of
1 process, then of ``--workers 2``; the load comes from a separate process (bench.submit_client)
over keep-alive connections. The worker is live (the model is served) but its one slot stays
busy, so the jobs wait in the queue: the front is measured, not the worker's drain beside it.
"""

from __future__ import annotations

import itertools
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench import ROOT
from bench.measure import ms, pct
from bench.stack import http_server
from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_for, wait_workers
from streamq.processes import free_port

CONCURRENCY = (1, 16, 64, 256)


@dataclass
class Row:
    processes: int  # 0: the floor app
    c: int
    rate: float
    p50: float
    p99: float
    errors: int
    first_error: str


TARGET_RATE = 1000  # submits/s at c=64, one front process
TARGET_P99 = 0.050


def _front(env: dict[str, str], workdir: Path, processes: int) -> tuple[Service, int]:
    front, url = start_front(env, workdir, f"submits-front-{processes}", extra=["--workers", str(processes)])
    return front, int(url.rsplit(":", 1)[1])


def _occupy(port: int) -> None:
    """Give the worker's one slot a job that outlasts the run (its first token comes at once, the
    next after 100 s), and wait until it runs."""
    import httpx

    base = f"http://127.0.0.1:{port}"
    body = {"prompt": "hi", "max_tokens": 100, "model": "synthetic"}
    job_url = f"{base}/v1/jobs/{httpx.post(f'{base}/v1/jobs', json=body).json()['id']}"
    wait_for(lambda: httpx.get(job_url).json()["status"] == "running", 30, "the job to run")


def _load(port: int, concurrency: int, seconds: float, workdir: Path) -> dict[str, object]:
    out = workdir / f"submits-{port}-{concurrency}.json"
    command = [sys.executable, "-m", "bench.submit_client", "--port", str(port)]
    command += ["--concurrency", str(concurrency), "--seconds", str(seconds), "--out", str(out)]
    subprocess.run(command, cwd=ROOT, check=True, timeout=seconds + 120)
    result: dict[str, object] = json.loads(out.read_text())
    return result


def _cells(
    port: int, processes: int, concurrency: tuple[int, ...], seconds: float, workdir: Path
) -> list[Row]:
    _load(port, 4, 1.0, workdir)  # warm-up
    rows = []
    for c in concurrency:
        result = _load(port, c, seconds, workdir)
        latencies = [float(x) for x in result["latencies"]]  # type: ignore[attr-defined]
        rate = len(latencies) / float(result["seconds"])  # type: ignore[arg-type]
        errors, first = int(result["errors"]), str(result["first_error"])  # type: ignore[call-overload]
        rows.append(Row(processes, c, rate, pct(latencies, 0.5), pct(latencies, 0.99), errors, first))
    return rows


def measure(workdir: Path, processes: int, concurrency: tuple[int, ...], seconds: float) -> list[Row]:
    """streamq's front of ``processes`` processes."""
    server = RedisServer()
    # No queue limit: the queue grows while the busy worker takes none of the jobs.
    env = {"STREAMQ_REDIS_URL": server.url, "STREAMQ_MAX_QUEUED": "0", "STREAMQ_LOG_LEVEL": "WARNING"}
    services: list[Service] = []
    try:
        # A live worker whose one slot is busy with a job that outlasts the run: the jobs wait, and
        # the front's submits are measured alone on the machine's two cores, not beside a drain.
        services.append(start_synthetic_worker(env, workdir, "synthetic", "submits-worker", 0.01, slots=1))
        front, port = _front(env, workdir, processes)
        services.append(front)
        wait_workers(f"http://127.0.0.1:{port}", 1, timeout=60)
        _occupy(port)
        return _cells(port, processes, concurrency, seconds, workdir)
    finally:
        for service in reversed(services):
            service.stop()
        server.close()


def measure_floor(workdir: Path, concurrency: tuple[int, ...], seconds: float) -> list[Row]:
    """The same load against bench.submit_floor (one process): the floor under a submit."""
    server = RedisServer()
    port = free_port()
    env = {**os.environ, "STREAMQ_REDIS_URL": server.url, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "uvicorn", "bench.submit_floor:app", "--port", str(port)]
    command += ["--log-level", "warning", "--no-access-log"]
    try:
        with http_server(command, env, port, workdir / "submit-floor.log", "the floor app", 60):
            return _cells(port, 0, concurrency, seconds, workdir)
    finally:
        server.close()


def run_submits(workdir: Path, seconds: float = 5.0, concurrency: tuple[int, ...] = CONCURRENCY) -> None:
    floor = {r.c: r for r in measure_floor(workdir, concurrency, seconds)}
    rows = measure(workdir, 1, concurrency, seconds) + measure(workdir, 2, concurrency, seconds)
    print(
        f"\nsubmits — {platform.platform()}, {os.cpu_count()} cores\n"
        f"command: {' '.join(['python -m bench', *sys.argv[1:]])}\n"
        f"POST /v1/jobs (1-token synthetic jobs, open access) over keep-alive connections, {seconds:.0f} s "
        "per cell; a live synthetic worker, busy (the jobs wait). floor: a FastAPI app that validates the\n"
        "body and writes one Redis hash (bench/submit_floor.py), same run, one process. Targets at c=64, "
        f"one front process: ≥ {TARGET_RATE}/s, p99 ≤ {TARGET_P99 * 1000:.0f} ms"
    )
    print(
        f"{'front':>8}{'c':>6}{'submits/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'floor/s':>9}{'÷ floor':>9}   verdict"
    )
    for r in [*floor.values(), *rows]:
        verdict = ""
        if r.processes == 1 and r.c == 64:
            verdict = "met" if r.rate >= TARGET_RATE and r.p99 <= TARGET_P99 else "MISSED"
        name = "floor" if r.processes == 0 else f"{r.processes} proc"
        base = floor[r.c].rate
        print(
            f"{name:>8}{r.c:>6}{r.rate:>11.0f}{ms(r.p50):>9}{ms(r.p99):>9}{r.errors:>8}"
            f"{base:>9.0f}{r.rate / base:>8.2f}x   {verdict}"
        )
    for processes in (1, 2):
        rates = [r.rate for r in rows if r.processes == processes]
        falls = any(b < 0.95 * a for a, b in itertools.pairwise(rates))
        print(f"{processes} process(es): the rate {'FALLS' if falls else 'never falls'} as concurrency rises")
    errors = [r.first_error for r in [*floor.values(), *rows] if r.first_error]
    if errors:
        print(f"first error: {errors[0]}")
