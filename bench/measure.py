"""Shared measurement helpers: percentiles, per-request timings, and /proc readings of a process."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024


def pct(values: list[float], q: float) -> float:
    """The q-quantile by nearest rank (NaN for no values)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class RequestTiming:
    """One request's tokens, times relative to t=0 (when every client of the cell started)."""

    first: float  # first token received (its TTFT)
    last: float  # last token received
    tokens: int  # tokens generated (the system's own count where it gives one)


@dataclass
class Cell:
    """One system at one concurrency: throughput, TTFT, inter-token latency and peak memory."""

    requests: list[RequestTiming] = field(default_factory=list)
    rss_mib: float = float("nan")
    error: str = ""

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.requests)

    @property
    def wall(self) -> float:
        return max((r.last for r in self.requests), default=float("nan"))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.requests and self.wall > 0 else float("nan")

    def ttft(self, q: float) -> float:
        return pct([r.first for r in self.requests], q)

    @property
    def itl(self) -> float:
        """Per request (last - first) / (tokens - 1); the median over requests."""
        return pct([(r.last - r.first) / (r.tokens - 1) for r in self.requests if r.tokens > 1], 0.5)

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": [[r.first, r.last, r.tokens] for r in self.requests],
            "rss_mib": self.rss_mib,
            "error": self.error,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Cell:
        reqs = [RequestTiming(float(a), float(b), int(n)) for a, b, n in data.get("requests", [])]
        return cls(reqs, float(data.get("rss_mib", float("nan"))), str(data.get("error", "")))


@dataclass
class RepeatedCell(Cell):
    """One cell run several times (one run is one burst of requests): throughput
    is the median of the runs', TTFT and ITL are over every request of every run."""

    rates: list[float] = field(default_factory=list)

    @classmethod
    def of(cls, runs: list[Cell]) -> RepeatedCell:
        cell = cls(
            requests=[r for run in runs for r in run.requests], rates=[run.tokens_per_s for run in runs]
        )
        cell.rss_mib = max(run.rss_mib for run in runs)
        return cell

    @property
    def tokens_per_s(self) -> float:
        ordered = sorted(self.rates)
        return ordered[len(ordered) // 2] if ordered else float("nan")


def proc_status(pid: int, key: str) -> float:
    """A /proc/PID/status memory line (VmHWM, VmRSS) in MiB; NaN when unreadable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def reset_peak_rss(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux: write 5 to clear_refs)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (its threads included), in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def ms(seconds: float) -> str:
    return "n/a" if seconds != seconds else f"{seconds * 1000:.1f}"
