"""Rows (c) and (d): c streaming HTTP clients against a served model, all starting at t=0.

(c) streamq's full stack: a private redis-server, one front, one worker (real processes);
    each client POSTs /v1/jobs, then reads the job's SSE stream.
(d) ``transformers serve --continuous-batching`` on the same folder; each client streams
    /v1/chat/completions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from bench import ROOT
from bench.http_client import HTTPError, post_json, stream_lines
from bench.measure import Cell, RequestTiming, proc_status, reset_peak_rss
from harness.redis_server import RedisServer
from harness.services import Service, start_front, wait_for, wait_workers
from streamq.processes import free_port

HOST = "127.0.0.1"
WORKER_SLOTS = 16
TORCH_THREADS = 2  # rows (c) and (d), unless the run asks for another count
HF_BLOCK = 32
HF_BATCH_TOKENS = 512  # per step, as streamq's prefill chunk


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def _streamq_client(port: int, prompt: str, tokens: int, t0: float) -> RequestTiming:
    body = {"messages": messages(prompt), "max_tokens": tokens, "temperature": 0, "top_p": 1.0}
    status, job = await post_json(HOST, port, "/v1/jobs", body)
    if status != 202:
        raise HTTPError(f"POST /v1/jobs: HTTP {status}: {job}")
    first = last = 0.0
    event = ""
    async for now, line in stream_lines(HOST, port, "GET", f"/v1/jobs/{job['id']}/events"):
        if line.startswith("event: "):
            event = line[7:]
        elif line.startswith("data: ") and event == "delta":
            first = first or now
            last = now
        elif line.startswith("data: ") and event == "done":
            n = int(json.loads(line[6:])["usage"]["completion_tokens"])
            return RequestTiming(first - t0, last - t0, n)
        elif line.startswith("data: ") and event in ("error", "canceled"):
            raise HTTPError(f"job {job['id']} ended {event}: {line[6:]}")
    raise HTTPError(f"job {job['id']}: the stream ended without a final event")


async def _hf_client(port: int, model: str, prompt: str, tokens: int, t0: float) -> RequestTiming:
    body = {
        "model": model,
        "messages": messages(prompt),
        "stream": True,
        "temperature": 0,
        "max_tokens": tokens,
        "stream_options": {"include_usage": True},
    }
    first = last = 0.0
    chunks = 0
    usage = None
    async for now, line in stream_lines(HOST, port, "POST", "/v1/chat/completions", body):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        data = json.loads(line[6:])
        if data.get("usage"):
            usage = int(data["usage"]["completion_tokens"])
        for choice in data.get("choices") or []:
            if (choice.get("delta") or {}).get("content"):
                first = first or now
                last = now
                chunks += 1
    if not chunks:
        raise HTTPError("transformers serve streamed no content")
    return RequestTiming(first - t0, last - t0, usage or chunks)


def _run_clients(make: object, prompts: list[str], tokens: int) -> list[RequestTiming]:
    """All clients at once; a cell that does not end in time fails rather than hangs (a job that
    never gets its final event, say)."""
    limit = 120 + 0.5 * tokens * len(prompts)

    async def all_at_once() -> list[RequestTiming]:
        t0 = time.time()
        clients = asyncio.gather(*(make(p, t0) for p in prompts))  # type: ignore[operator]
        try:
            return list(await asyncio.wait_for(clients, limit))
        except TimeoutError:
            raise TimeoutError(f"the clients did not finish within {limit:.0f} s") from None

    return asyncio.run(all_at_once())


@contextlib.contextmanager
def streamq_stack(
    model_dir: Path,
    workdir: Path,
    extra_env: dict[str, str] | None = None,
    slots: int = WORKER_SLOTS,
    start_timeout: float = 300,
    threads: int = TORCH_THREADS,
) -> Iterator[tuple[int, int]]:
    """A private Redis, one front and one worker (16 slots, ``threads`` torch threads, default
    settings otherwise, plus ``extra_env``); yields (front port, worker pid) and stops all three, whatever
    happens."""
    server = RedisServer()
    env = {
        "STREAMQ_REDIS_URL": server.url,
        "STREAMQ_TORCH_THREADS": str(threads),
        **(extra_env or {}),
    }
    services: list[Service] = []
    try:
        worker = Service(
            ["worker", "--model", str(model_dir), "--slots", str(slots), "--name", "bench-tp-worker"],
            env,
            f"worker-{model_dir.name}",
            workdir,
        )
        services.append(worker)
        front, url = start_front(env, workdir, f"front-{model_dir.name}")
        services.append(front)
        wait_workers(url, 1, timeout=start_timeout)
        yield int(url.rsplit(":", 1)[1]), worker.proc.pid
    finally:
        for service in reversed(services):
            service.stop()
        server.close()


def streamq_cell(port: int, worker_pid: int, prompts: list[str], tokens: int) -> Cell:
    _run_clients(lambda p, t0: _streamq_client(port, p, 2, t0), prompts[:1], 2)  # warm-up
    reset_peak_rss(worker_pid)
    cell = Cell(_run_clients(lambda p, t0: _streamq_client(port, p, tokens, t0), prompts, tokens))
    cell.rss_mib = proc_status(worker_pid, "VmHWM")
    return cell


def hf_command(
    model_dir: Path, port: int, max_concurrency: int, tokens: int, prompt_tokens: int
) -> list[str]:
    """``transformers serve`` (through bench.hf_serve where accelerate is missing) with a KV cache
    bounded to what the largest cell needs: its default sizing took 5 GiB of RAM on the CPU."""
    per_request = math.ceil((prompt_tokens + tokens + 8) / HF_BLOCK) + 1
    blocks = max_concurrency * per_request + 8
    return [
        sys.executable,
        "-m",
        "bench.hf_serve",
        str(model_dir),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--continuous-batching",
        "--cb-block-size",
        str(HF_BLOCK),
        "--cb-num-blocks",
        str(blocks),
        "--cb-max-batch-tokens",
        str(HF_BATCH_TOKENS),
        "--host",
        HOST,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]


@contextlib.contextmanager
def hf_server(
    model_dir: Path,
    workdir: Path,
    max_concurrency: int,
    tokens: int,
    prompt_tokens: int,
    threads: int = TORCH_THREADS,
) -> Iterator[tuple[int, int]]:
    """``transformers serve --continuous-batching`` on ``threads`` torch threads; yields (port, pid)."""
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    command = hf_command(model_dir, port, max_concurrency, tokens, prompt_tokens)
    log_path = workdir / f"hf-serve-{model_dir.name}.log"
    with http_server(command, env, port, log_path, "transformers serve", 300) as pid:
        yield port, pid


@contextlib.contextmanager
def http_server(
    command: list[str], env: dict[str, str], port: int, log_path: Path, name: str, timeout: float
) -> Iterator[int]:
    """Run a server until its /health answers 200 (``timeout`` seconds at most); yields its pid
    and stops it, whatever happens."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:

            def up() -> bool:
                if proc.poll() is not None:
                    return True
                try:
                    return httpx.get(f"http://{HOST}:{port}/health", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(up, timeout, f"{name} to listen")
            if proc.poll() is not None:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                raise RuntimeError(f"{name} exited: {' '.join(tail)}")
            yield proc.pid
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def hf_cell(port: int, pid: int, model: str, prompts: list[str], tokens: int) -> Cell:
    _run_clients(lambda p, t0: _hf_client(port, model, p, 2, t0), prompts[:1], 2)  # warm-up
    reset_peak_rss(pid)
    cell = Cell(_run_clients(lambda p, t0: _hf_client(port, model, p, tokens, t0), prompts, tokens))
    cell.rss_mib = proc_status(pid, "VmHWM")
    return cell
