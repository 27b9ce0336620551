"""Run the benchmarks: ``python -m bench [--only PART] [--quick]``; the parts:

core: submit → first delta and the front's Redis connections (bench/core.py);
submits: submits/s and POST latency of one front as concurrency rises, 1 and 2 processes (bench/submits.py);
commands: Redis commands per job, per token, and per idle second (bench/redis_commands.py);
throughput: streamq against transformers, in-process and over HTTP (bench/throughput.py);
fanout: 1,000 SSE clients on one front, and dispatch latency when idle (bench/fanout.py);
recovery: cancel latency with 16 running jobs, and crash detection (bench/recovery.py);
security: what API keys, ownership and per-key quotas add to a request (bench/security.py);
vllm: streamq on vLLM's engine against vLLM's own server (bench/vllm_rows.py; not in the default
run: it needs `make install-vllm` and takes about an hour on 2 cores);
json-mask: what a JSON answer costs vLLM's engine step, streamq's mask against vLLM's allowed_token_ids
(bench/json_mask.py; not in the default run: it needs `make install-vllm`);
chaos: a soak under mixed load while workers, fronts and the Redis primary are killed, then an audit of
every job: none lost, no stream with a gap or a repeat (bench/chaos.py; not in the default run: it takes
about twice --chaos-minutes plus 2 minutes, the result TTL's expiry included; it exits non-zero when a
check fails).
Every process started here is stopped before it returns, on error or interrupt too.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from bench.core import run_core

PARTS: tuple[str, ...] = ("core", "submits", "commands", "throughput", "fanout", "recovery", "security")
PARTS += ("vllm", "json-mask", "chaos")
DEFAULT_PARTS = PARTS[:-3]
SHAPES = ("tiny", "qwen2.5-0.5b")


def _stop_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through every finally: children are stopped


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--only", choices=PARTS, action="append", help="run this part only (repeatable)")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument(
        "--tokens", type=int, help="new tokens per request, throughput (default 128; quick 16)"
    )
    parser.add_argument("--models", help=f"throughput models, comma-separated (default: {','.join(SHAPES)})")
    parser.add_argument("--systems", default="abcd", help="throughput rows to run (default abcd)")
    parser.add_argument(
        "--torch-threads", type=int, default=2, help="throughput: torch threads of rows a-d (default 2)"
    )
    parser.add_argument("--vllm-systems", default="cef", help="vllm rows to run (default cef)")
    parser.add_argument(
        "--vllm-dtypes", default="float32,bfloat16", help="vllm: dtypes to run (default float32,bfloat16)"
    )
    parser.add_argument("--jobs", type=int, help="core: sequential jobs for the latency rows (default 50)")
    parser.add_argument("--streams", type=int, help="core: concurrent SSE streams (default 200)")
    parser.add_argument("--clients", type=int, help="fanout: concurrent SSE clients (default 1000)")
    parser.add_argument("--fanout-workers", type=int, default=1, help="fanout: synthetic worker processes")
    parser.add_argument(
        "--chaos-minutes", type=float, help="chaos: minutes of load and kills (default 3; quick 1)"
    )
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    parts = args.only or list(DEFAULT_PARTS)
    quick = args.quick
    workdir = Path(tempfile.mkdtemp(prefix="streamq-bench-"))
    start = time.monotonic()
    failed: list[str] = []
    try:
        if "core" in parts:
            run_core(jobs=args.jobs or (10 if quick else 50), streams=args.streams or (50 if quick else 200))
        if "submits" in parts:
            from bench.submits import run_submits

            run_submits(workdir, seconds=2.0 if quick else 5.0)
        if "commands" in parts:
            from bench.redis_commands import run_commands

            run_commands(workdir, jobs=50 if quick else 200)
        if "throughput" in parts:
            from bench.throughput import run_throughput

            shapes = args.models.split(",") if args.models else list(SHAPES)
            tokens = args.tokens or (16 if quick else 128)
            run_throughput(workdir, tokens, shapes, args.systems, args.torch_threads)
        if "fanout" in parts:
            from bench.fanout import run_fanout

            clients = args.clients or (100 if quick else 1000)
            tokens = 60 if quick else 200
            run_fanout(
                workdir,
                clients,
                tokens,
                idle_jobs=20 if quick else 200,
                window=1.5 if quick else 5.0,
                workers=args.fanout_workers,
            )
        if "recovery" in parts:
            from bench.recovery import run_recovery

            run_recovery(workdir)
        if "security" in parts:
            from bench.security import run_security

            run_security(workdir, jobs=50 if quick else 500)
        if "vllm" in parts:
            from bench.vllm_rows import run_vllm

            shape = args.models or "qwen2.5-0.5b"
            dtypes = tuple(d.strip() for d in args.vllm_dtypes.split(",") if d.strip())
            run_vllm(workdir, args.tokens or (16 if quick else 128), shape, args.vllm_systems, dtypes)
        if "json-mask" in parts:
            from bench.json_mask import run_json_mask

            run_json_mask(workdir)
        if "chaos" in parts:
            from bench.chaos import run_chaos

            failed += [
                f"chaos: {check}" for check in run_chaos(workdir, args.chaos_minutes or (1 if quick else 3))
            ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"\n(benchmarks took {time.monotonic() - start:.0f} s)")
    if failed:
        print(f"FAILED: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
