"""Front fan-out and dispatch, model-free: a synthetic worker (paced tokens through the real
engine, publisher and Redis path) behind one front.

* Fan-out: ``clients`` concurrent SSE clients, each on its own job of ``tokens`` tokens at 20
  tokens/s: delivery latency (client receipt - Redis stream entry id time), the front's Redis
  connections, RSS and CPU while every stream is open.
* Dispatch on an idle system: submit → first delta, over sequential jobs.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis

from bench import ROOT
from bench.http_client import post_json, stream_lines
from bench.measure import cpu_seconds, ms, pct, proc_status
from harness.redis_server import RedisServer
from harness.services import Service, start_front, wait_workers
from shared.settings import Settings

HOST = "127.0.0.1"
TOKENS_PER_SECOND = 20
CLIENT_PROCESSES = 2


async def _first_delta(port: int) -> float:
    start = time.perf_counter()
    status, job = await post_json(
        HOST, port, "/v1/jobs", {"prompt": "hi", "max_tokens": 1, "model": "synthetic"}
    )
    if status != 202:
        raise RuntimeError(f"POST /v1/jobs: HTTP {status}: {job}")
    async for _now, line in stream_lines(HOST, port, "GET", f"/v1/jobs/{job['id']}/events"):
        if line == "event: delta":
            return time.perf_counter() - start
    raise RuntimeError("the stream ended before a delta")


def idle_first_delta(port: int, jobs: int) -> list[float]:
    async def sequential() -> list[float]:
        for _ in range(5):  # warm-up
            await _first_delta(port)
        return [await _first_delta(port) for _ in range(jobs)]

    return asyncio.run(sequential())


def _wait_line(proc: subprocess.Popen[str], timeout: float) -> bool:
    """Wait for the client process to print its OPEN line."""
    seen = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.strip() == "OPEN":
                seen.set()
                return

    threading.Thread(target=read, daemon=True).start()
    return seen.wait(timeout)


def fan_out(
    port: int,
    pids: dict[str, list[int]],
    redis_url: str,
    clients: int,
    tokens: int,
    window: float,
    workdir: Path,
) -> dict[str, float | int | str]:
    """``pids``: the processes whose CPU is measured while every stream is open (the front's
    first, under "front"); the client processes are added as "clients"."""
    front_pid = pids["front"][0]
    procs: list[subprocess.Popen[str]] = []
    outs = []
    split = [
        clients // CLIENT_PROCESSES + (1 if i < clients % CLIENT_PROCESSES else 0)
        for i in range(CLIENT_PROCESSES)
    ]
    try:
        for i, n in enumerate(x for x in split if x):
            out = workdir / f"fanout-client-{i}.json"
            outs.append(out)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "bench.fanout_client",
                        *("--port", str(port), "--clients", str(n)),
                        *("--tokens", str(tokens), "--out", str(out)),
                    ],
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    text=True,
                )
            )
        ramp_start = time.monotonic()
        all_open = all(_wait_line(p, 120) for p in procs)
        ramp = time.monotonic() - ramp_start
        steady_from = time.time()  # every stream has opened (the earliest jobs may have ended)
        measured = {**pids, "clients": [p.pid for p in procs]}
        cpu0, t0 = _cpu(measured), time.monotonic()
        time.sleep(window / 2)
        r = redis.Redis.from_url(redis_url, decode_responses=True)
        front_conns = sum(1 for c in r.client_list() if c.get("name") == "streamq-front")
        r.close()
        time.sleep(window / 2)
        elapsed = time.monotonic() - t0
        cpu = {name: (used - cpu0[name]) / elapsed for name, used in _cpu(measured).items()}
        rss_now = proc_status(front_pid, "VmRSS")
        for p in procs:
            p.wait(timeout=tokens / TOKENS_PER_SECOND + 300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    latencies: list[float] = []
    steady: list[float] = []
    steady_published: list[float] = []
    failed = 0
    errors: list[str] = []
    for out in outs:
        if not out.exists():
            failed += 1
            errors.append(f"client process wrote no {out.name}")
            continue
        data = json.loads(out.read_text())
        latencies += [lat for _published, lat in data["latencies"]]
        steady += [lat for published, lat in data["latencies"] if published >= steady_from]
        steady_published += [published for published, _lat in data["latencies"] if published >= steady_from]
        failed += data["failed"]
        errors += data["errors"]
    span = max(steady_published, default=0.0) - steady_from
    return {
        "all_open": int(all_open),
        "ramp": ramp,
        "p50": pct(steady, 0.5) if steady else float("nan"),
        "p99": pct(steady, 0.99) if steady else float("nan"),
        "deltas": len(steady),
        # The load the front relayed: a worker short of CPU coalesces more tokens per delta.
        "delta_rate": len(steady) / span if span > 0 else 0.0,
        "ramp_p99": pct(latencies, 0.99),
        "failed": failed,
        "error": errors[0] if errors else "",
        "front_conns": front_conns,
        "rss_now": rss_now,
        "rss_peak": proc_status(front_pid, "VmHWM"),
        **{f"cpu_{name}": share * 100 for name, share in cpu.items()},
    }


def _cpu(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds used so far by each group of processes."""
    return {name: sum(cpu_seconds(pid) for pid in group) for name, group in pids.items()}


def run_fanout(
    workdir: Path, clients: int, tokens: int, idle_jobs: int, window: float, workers: int = 1
) -> None:
    server = RedisServer()
    env = {"STREAMQ_REDIS_URL": server.url}
    services: list[Service] = []
    slots = -(-clients // workers)
    try:
        for i in range(workers):
            args = ["worker", "--backend", "synthetic", "--tokens-per-second", str(TOKENS_PER_SECOND)]
            args += ["--slots", str(slots), "--served-name", "synthetic", "--name", f"bench-synthetic-{i}"]
            # A worker sizes its pool from its slots (worker.slot_pool.worker_connection).
            services.append(Service(args, {"STREAMQ_REDIS_URL": server.url}, f"synthetic-{i}", workdir))
        worker_pids = [service.proc.pid for service in services]
        front, url = start_front(env, workdir, "fanout-front")
        services.append(front)
        wait_workers(url, workers, timeout=120)
        port = int(url.rsplit(":", 1)[1])
        idle = idle_first_delta(port, idle_jobs)
        assert server.proc is not None
        pids = {"front": [front.proc.pid], "workers": worker_pids, "redis": [server.proc.pid]}
        load = fan_out(port, pids, server.url, clients, tokens, window, workdir)
    finally:
        for service in reversed(services):
            service.stop()
        server.close()
    print_fanout(clients, tokens, workers, slots, idle, load, window)


def print_fanout(
    clients: int,
    tokens: int,
    workers: int,
    slots: int,
    idle: list[float],
    load: dict[str, float | int | str],
    window: float,
) -> None:
    print(
        f"\nfront fan-out and dispatch — {platform.platform()}, {os.cpu_count()} cores\n"
        f"command: {' '.join(['python -m bench', *sys.argv[1:]])}\n"
        f"{clients} SSE clients, each on its own job of {tokens} tokens at {TOKENS_PER_SECOND} tokens/s; "
        f"synthetic worker: {workers} process(es) × {slots} slots; one front"
    )
    print(f"{'measure':<58}{'value':>12}{'target':>10}   verdict")

    def row(name: str, value: str, target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("met" if ok else "MISSED")
        print(f"{name:<58}{value:>12}{target:>10}   {verdict}")

    p50, p99 = float(load["p50"]), float(load["p99"])
    row("delivery latency p50, after the ramp (ms)", ms(p50))
    row("delivery latency p99, after the ramp (ms)", ms(p99), "≤ 50", p99 <= 0.050)
    row("deltas measured after the ramp", str(load["deltas"]))
    row("deltas relayed per second after the ramp", f"{float(load['delta_rate']):.0f}")
    row("delivery latency p99, ramp and submits included (ms)", ms(float(load["ramp_p99"])))
    row("clients failed", str(load["failed"]), "0", load["failed"] == 0)
    row("ramp: clients started → every stream open (s)", f"{float(load['ramp']):.1f}")
    # The front's connections are bounded by its pools, whatever the number of streams: one
    # reader follows them all; the shared pool opens what the submits' round trips need at once;
    # 2 for RQ, 2 for prompt counts, 2 for the janitor and the epoch check (the front inherits
    # this process's environment).
    bound = Settings().redis_max_connections + 7
    row(
        "Redis connections held by the front (not one per stream)",
        str(load["front_conns"]),
        f"≤ {bound}",
        int(load["front_conns"]) <= bound,
    )
    row(
        "front RSS peak (VmHWM, MiB)",
        f"{float(load['rss_peak']):.0f}",
        "≤ 500",
        float(load["rss_peak"]) <= 500,
    )
    row("front RSS with every stream open (VmRSS, MiB)", f"{float(load['rss_now']):.0f}")
    # Where the machine's CPU goes while every stream is open: the target is the front's, but on
    # one machine the workers, Redis and the clients share its cores with it.
    for name, label in (
        ("front", "the front"),
        ("workers", "synthetic workers"),
        ("redis", "Redis"),
        ("clients", "the clients"),
    ):
        row(f"CPU, every stream open (% of a core): {label}", f"{float(load['cpu_' + name]):.0f}")
    row(
        f"idle: submit → first delta p50 ({len(idle)} jobs, ms)",
        ms(pct(idle, 0.5)),
        "≤ 5",
        pct(idle, 0.5) <= 0.005,
    )
    row(f"idle: submit → first delta p99 ({len(idle)} jobs, ms)", ms(pct(idle, 0.99)))
    if load["error"]:
        print(f"first client error: {load['error']}")
    print(
        "notes: delivery latency = client receipt time − the SSE id's time (the Redis stream entry id,\n"
        "       stamped by Redis at publish, millisecond resolution); deltas published before their stream\n"
        "       opened (history replay) are left out. Clients: raw asyncio HTTP/1.1, "
        f"{CLIENT_PROCESSES} processes."
    )
