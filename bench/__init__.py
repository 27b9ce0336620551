"""Benchmarks: `python -m bench` (or `make bench`) prints a table per measurement."""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the checkout: bench's own processes run from here
