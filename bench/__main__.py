"""Run the benchmarks: ``python -m bench [--jobs N] [--streams N]``."""

from __future__ import annotations

import argparse
import sys

from bench.core import run_core


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--jobs", type=int, default=50, help="sequential jobs for the latency rows")
    parser.add_argument("--streams", type=int, default=200, help="concurrent SSE streams for the fan-out row")
    args = parser.parse_args()
    run_core(jobs=args.jobs, streams=args.streams)
    return 0


if __name__ == "__main__":
    sys.exit(main())
