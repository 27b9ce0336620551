"""Submit load: ``python -m bench.submit_client --port P --concurrency C --seconds S --out F``.

C keep-alive HTTP/1.1 connections each POST /v1/jobs back to back for S seconds (after a
warm-up second) and record each request's latency. Writes {"latencies": [...], "errors": n,
"first_error": "...", "seconds": measured wall time} to F. Raw asyncio on uvloop where it is
installed: the client must cost far less than the front it loads (they share the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

HOST = "127.0.0.1"
WARMUP = 1.0


def _request(port: int, body: bytes) -> bytes:
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def _one(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> tuple[int, bytes]:
    writer.write(request)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("the front closed the connection")
    status = int(status_line.split()[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        if line[:15].lower() == b"content-length:":
            length = int(line[15:])
    body = await reader.readexactly(length) if length else b""
    return status, body


async def _connection(
    port: int, request: bytes, start: float, end: float, latencies: list[float], errors: list[str]
) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        while True:
            sent = time.perf_counter()
            if sent >= end:
                return
            status, body = await _one(reader, writer, request)
            done = time.perf_counter()
            if status != 202:
                errors.append(f"HTTP {status}: {body[:200].decode(errors='replace')}")
            elif sent >= start:
                latencies.append(done - sent)
    except (ConnectionError, asyncio.IncompleteReadError) as exc:
        errors.append(f"{type(exc).__name__}: {exc}")
    finally:
        writer.close()


async def load(port: int, concurrency: int, seconds: float, body: bytes) -> dict[str, object]:
    request = _request(port, body)
    latencies: list[float] = []
    errors: list[str] = []
    t0 = time.perf_counter()
    start, end = t0 + WARMUP, t0 + WARMUP + seconds
    await asyncio.gather(
        *(_connection(port, request, start, end, latencies, errors) for _ in range(concurrency))
    )
    return {
        "latencies": latencies,
        "seconds": max(time.perf_counter(), end) - start,
        "errors": len(errors),
        "first_error": errors[0] if errors else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--model", default="synthetic")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    body = json.dumps({"prompt": "hi", "max_tokens": 1, "model": args.model}).encode()
    result = asyncio.run(load(args.port, args.concurrency, args.seconds, body))
    with open(args.out, "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
