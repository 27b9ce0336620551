"""Core path: submit → first delta latency, and the front's Redis connections under many streams.

Everything runs here, in one go, on this machine: a private redis-server, one front under
uvicorn, one worker with the tiny model. Baselines are measured in the same run:
  * latency: the same prompt's first token generated in-process (no queue, no Redis, no HTTP);
  * connections: one blocking Redis connection per open stream (the design the hub replaces).
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

import httpx
import redis

from harness.redis_server import RedisServer
from harness.services import start_front, start_worker, wait_workers
from shared.schemas import ChatMessage, GenerationRequest
from streamq.sse import asse_lines, sse_lines

PROMPT = "Say something about queues."
MAX_TOKENS = 16


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def in_process_first_token(model_dir: Path, runs: int) -> list[float]:
    import torch

    from worker.model_loading import load_backend

    torch.set_num_threads(1)
    backend = load_backend(str(model_dir), device="cpu", dtype="float32")
    req = GenerationRequest(
        messages=[ChatMessage(role="user", content=PROMPT)], max_tokens=MAX_TOKENS, temperature=0.0, top_p=1.0
    )
    for _ in backend.generate(req.model_copy(update={"max_tokens": 2})):
        pass  # warm-up: loading the model does none
    out = []
    for _ in range(runs):
        start = time.perf_counter()
        steps = backend.generate(req)
        assert isinstance(steps, Generator)  # generate is a generator function: close ends it now
        next(steps)
        out.append(time.perf_counter() - start)
        steps.close()
    return out


def submit_to_first_delta(url: str, runs: int) -> dict[str, list[float]]:
    """Per job: POST sent → first delta read from SSE (client), job created → worker started (RQ),
    and job created → first delta written to Redis (the stream entry id holds Redis' clock)."""
    out: dict[str, list[float]] = {"client": [], "queue": [], "published": []}
    body = {"prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}
    with httpx.Client(timeout=30) as client:
        for _ in range(runs):
            start = time.perf_counter()
            job = client.post(f"{url}/v1/jobs", json=body).json()
            first_id = None
            with client.stream("GET", f"{url}/v1/jobs/{job['id']}/events") as response:
                last_id = None
                for line in sse_lines(response.iter_text()):
                    if line.startswith("id: "):
                        last_id = line[4:]
                    if line == "event: delta" and first_id is None:
                        out["client"].append(time.perf_counter() - start)
                        first_id = last_id
                    if line == "event: done":
                        break
            view = client.get(f"{url}/v1/jobs/{job['id']}").json()
            out["queue"].append(view["started_at"] - view["created_at"])
            if first_id is not None:
                out["published"].append(int(first_id.split("-")[0]) / 1000 - view["created_at"])
    return out


async def hold_streams(url: str, redis_url: str, count: int) -> dict[str, Any]:
    """Open ``count`` SSE streams on live jobs; count the front's Redis connections meanwhile."""
    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=count + 10)) as client:
        ids = []
        for _ in range(count):
            r = await client.post(f"{url}/v1/jobs", json={"prompt": PROMPT, "max_tokens": 64})
            ids.append(r.json()["id"])
        opened = asyncio.Event()
        open_count = 0

        async def listen(job_id: str) -> None:
            nonlocal open_count
            async with client.stream("GET", f"{url}/v1/jobs/{job_id}/events") as response:
                open_count += 1
                if open_count == count:
                    opened.set()
                async for line in asse_lines(response.aiter_text()):
                    if line.startswith("event: ") and line[7:] in ("done", "error", "canceled"):
                        return

        tasks = [asyncio.create_task(listen(i)) for i in ids]
        await asyncio.wait_for(opened.wait(), timeout=60)
        await asyncio.sleep(1.0)
        redis_client = redis.Redis.from_url(redis_url, decode_responses=True)
        front_conns = sum(1 for c in redis_client.client_list() if c.get("name") == "streamq-front")
        for job_id in ids:
            await client.post(f"{url}/v1/jobs/{job_id}/cancel")
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=120)
        return {"streams": count, "front_connections": front_conns}


def run_core(jobs: int, streams: int) -> None:
    from worker.tiny_model import make_tiny_model

    workdir = Path(tempfile.mkdtemp(prefix="streamq-bench-"))
    model = make_tiny_model(workdir / "streamq-tiny")
    server = RedisServer()
    env = {"STREAMQ_REDIS_URL": server.url, "STREAMQ_TORCH_THREADS": "1"}
    worker = start_worker(env, workdir, str(model), "bench-worker")
    front, url = start_front(env, workdir, "bench-front")
    try:
        wait_workers(url, 1)
        baseline = in_process_first_token(model, jobs)
        submit_to_first_delta(url, 5)  # warm-up
        latency = submit_to_first_delta(url, jobs)
        fanout = asyncio.run(hold_streams(url, server.url, streams))
    finally:
        front.stop()
        worker.stop()
        server.close()
        shutil.rmtree(workdir, ignore_errors=True)

    ms = 1000.0
    print(
        f"\nstreamq core benchmark — {platform.machine()}, {os.cpu_count()} cores, "
        f"tiny model on CPU, {jobs} jobs"
    )
    print(f"{'measure':<52}{'p50 ms':>10}{'p95 ms':>10}")
    rows = [
        ("baseline: first token in-process (no queue/HTTP)", baseline),
        ("submit → first delta at the client (HTTP+RQ+SSE)", latency["client"]),
        ("  job created → first delta in Redis (server side)", latency["published"]),
        ("  job created → worker started (RQ dequeue)", latency["queue"]),
    ]
    for name, values in rows:
        print(f"{name:<52}{pct(values, 0.5) * ms:>10.2f}{pct(values, 0.95) * ms:>10.2f}")
    overhead = pct(latency["client"], 0.5) - pct(baseline, 0.5)
    print(f"{'stack overhead over baseline (p50)':<52}{overhead * ms:>10.2f}")
    print(f"\n{'fan-out':<52}{'value':>10}")
    print(f"{'open SSE streams':<52}{fanout['streams']:>10}")
    print(f"{'Redis connections held by the front':<52}{fanout['front_connections']:>10}")
    print(f"{'baseline: one connection per stream':<52}{fanout['streams']:>10}")
    ratio = fanout["streams"] / max(1, fanout["front_connections"])
    print(f"{'connections saved (baseline / streamq)':<52}{ratio:>9.0f}x")
