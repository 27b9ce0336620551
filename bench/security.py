"""What API keys, ownership and per-key quotas cost a request.

Two fronts on one private Redis and one fast synthetic worker: the baseline front runs open (no
keys, no quotas), the other with keys, a concurrency quota and a request-rate quota (set high
enough never to refuse). The same sequential requests go to each, interleaved, in one run:
  * submit: ``POST /v1/jobs`` (rate hit + concurrency admit + owner written: two more Redis
    round trips);
  * view: ``GET /v1/jobs/{id}`` (key check + owner compared; no extra round trip).
"""

from __future__ import annotations

import os
import platform
import shutil
import tempfile
from pathlib import Path

import httpx

from bench.core import pct
from harness.redis_server import RedisServer
from harness.services import start_front, start_synthetic_worker, wait_workers

KEY = "sk-bench-0123456789abcdef"
MODEL = "synth"


def _timed(client: httpx.Client, url: str, headers: dict[str, str], jobs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"submit": [], "view": []}
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 1}
    for _ in range(jobs):
        r = client.post(f"{url}/v1/jobs", json=body, headers=headers)
        assert r.status_code == 202, r.text
        out["submit"].append(r.elapsed.total_seconds())
        v = client.get(f"{url}/v1/jobs/{r.json()['id']}", headers=headers)
        assert v.status_code == 200, v.text
        out["view"].append(v.elapsed.total_seconds())
    return out


def run_security(workdir: Path, jobs: int) -> None:
    logdir = Path(tempfile.mkdtemp(prefix="security-", dir=workdir))
    server = RedisServer()
    env = {"STREAMQ_REDIS_URL": server.url}
    keyed_env = env | {
        "STREAMQ_API_KEYS": f"bench:{KEY}",
        "STREAMQ_KEY_MAX_CONCURRENT": "100000",
        "STREAMQ_KEY_RATE_LIMIT": "1000000/minute",
    }
    services = [start_synthetic_worker(env, logdir, MODEL, "bench-synth", tokens_per_second=10000, slots=8)]
    try:
        open_front, open_url = start_front(env, logdir, "open-front")
        services.append(open_front)
        keyed_front, keyed_url = start_front(keyed_env, logdir, "keyed-front")
        services.append(keyed_front)
        wait_workers(open_url, 1)
        auth = {"Authorization": f"Bearer {KEY}"}
        results: dict[str, dict[str, list[float]]] = {"open": {"submit": [], "view": []}}
        results["keyed"] = {"submit": [], "view": []}
        with httpx.Client(timeout=30) as client:
            _timed(client, open_url, {}, 10)  # warm-up
            _timed(client, keyed_url, auth, 10)
            for _ in range(5):  # interleaved rounds: both see the same machine load
                for name, url, headers in (("open", open_url, {}), ("keyed", keyed_url, auth)):
                    for measure, values in _timed(client, url, headers, jobs // 5).items():
                        results[name][measure] += values
    finally:
        for service in services:
            service.stop()
        server.close()
        shutil.rmtree(logdir, ignore_errors=True)

    ms = 1000.0
    print(
        f"\nstreamq security overhead — {platform.machine()}, {os.cpu_count()} cores, "
        f"{jobs} requests of each kind per front"
    )
    print(f"{'request':<44}{'open p50':>10}{'keyed p50':>11}{'open p95':>10}{'keyed p95':>11}{'ratio':>8}")
    for measure, label in (
        ("submit", "POST /v1/jobs (keys + 2 quotas + owner)"),
        ("view", "GET /v1/jobs/{id} (key + owner check)"),
    ):
        o, k = results["open"][measure], results["keyed"][measure]
        ratio = pct(k, 0.5) / pct(o, 0.5)
        print(
            f"{label:<44}{pct(o, 0.5) * ms:>10.2f}{pct(k, 0.5) * ms:>11.2f}"
            f"{pct(o, 0.95) * ms:>10.2f}{pct(k, 0.95) * ms:>11.2f}{ratio:>7.2f}x"
        )
