"""Load for the fan-out table: ``python -m bench.fanout_client --port P --clients N --tokens T --out F``.

Each client submits its own job (POST /v1/jobs), then reads the job's SSE stream to its end.
Per delta it records (publish time, delivery latency): receipt time - the event's Redis stream entry id
time (Redis stamps the id when the worker publishes; same machine, same clock; the id has
millisecond resolution). Only events published after the stream opened count (earlier ones
are a replay of the stream's history, not a delivery). Prints "OPEN" once every stream is open,
then writes {"latencies": [...], "errors": [...]} to the output file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from bench.http_client import post_json, stream_lines

HOST = "127.0.0.1"
SUBMIT_AT_ONCE = 16


async def client(
    port: int,
    tokens: int,
    submit: asyncio.Semaphore,
    opened: list[int],
    total: int,
    latencies: list[tuple[float, float]],
) -> None:
    async with submit:
        body = {"prompt": "fan-out", "max_tokens": tokens, "model": "synthetic"}
        status, job = await post_json(HOST, port, "/v1/jobs", body)
    if status != 202:
        raise RuntimeError(f"POST /v1/jobs: HTTP {status}: {job}")
    open_at = None
    event_id = ""
    async for now, line in stream_lines(HOST, port, "GET", f"/v1/jobs/{job['id']}/events"):
        if open_at is None:
            open_at = now
            opened[0] += 1
            if opened[0] == total:
                print("OPEN", flush=True)
        if line.startswith("id: "):
            event_id = line[4:]
        elif line.startswith("event: "):
            event = line[7:]
            if event == "delta":
                published = int(event_id.split("-")[0]) / 1000
                if published >= open_at - 0.001:
                    latencies.append((published, now - published))
            elif event in ("done", "error", "canceled"):
                return


async def run(port: int, clients: int, tokens: int) -> dict[str, object]:
    submit = asyncio.Semaphore(SUBMIT_AT_ONCE)
    opened = [0]
    latencies: list[tuple[float, float]] = []
    tasks = [
        asyncio.create_task(client(port, tokens, submit, opened, clients, latencies)) for _ in range(clients)
    ]
    await asyncio.wait(tasks, timeout=tokens / 20 + 120)  # a stream that never ends counts as failed
    for task in tasks:
        task.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    if opened[0] < clients:
        print("OPEN", flush=True)  # some never opened: do not keep the parent waiting
    errors = [f"{type(r).__name__}: {r}" for r in results if isinstance(r, BaseException)]
    pairs = [[round(p, 3), round(x, 6)] for p, x in latencies]
    return {"latencies": pairs, "errors": errors[:20], "failed": len(errors)}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout_client")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--tokens", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.time()
    out = asyncio.run(run(args.port, args.clients, args.tokens))
    out["seconds"] = [time.time() - start]
    with open(args.out, "w") as f:
        json.dump(out, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
