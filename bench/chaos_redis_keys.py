"""Redis's keys by pattern, with their memory and TTLs: read before the chaos soak's load, and
again once the result TTL has passed (bench/chaos.py)."""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass

from harness.redis_sentinel import SentinelRedis


@dataclass
class Reading:
    keys: int
    memory: int
    patterns: Counter[str]
    ttls: dict[str, int]  # the longest TTL of a pattern's keys (-1: one has none)


def key_pattern(key: str) -> str:
    key = re.sub(r"\{[^}]*\}", "{*}", key)
    key = re.sub(r"[0-9a-f]{16,}", "*", key)
    return re.sub(r"chaos-w\d+", "chaos-w*", key)


def redis_reading(ha: SentinelRedis) -> Reading:
    r = ha.client()
    names = list(r.scan_iter(count=1000))
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.ttl(name)
    ttls: dict[str, int] = {}
    for name, ttl in zip(names, pipe.execute(), strict=True):
        pattern = key_pattern(name)
        ttls[pattern] = -1 if -1 in (ttl, ttls.get(pattern)) else max(ttl, ttls.get(pattern, 0))
    found = Counter(key_pattern(k) for k in names)
    return Reading(int(r.dbsize()), int(r.info("memory")["used_memory"]), found, ttls)


JOB_KEYS = ("streamq:job:", "streamq:events:", "streamq:text:", "rq:job:")


def wait_baseline(ha: SentinelRedis, last_finished: float, ttl: int) -> Reading:
    """Until no job's keys are left, or the result TTL plus a margin has passed since the last end."""
    deadline = time.monotonic() + min(ttl + 30, max(0.0, last_finished + ttl + 15 - time.time()))
    while True:
        reading = redis_reading(ha)
        left = sum(n for p, n in reading.patterns.items() if p.startswith(JOB_KEYS))
        if not left or time.monotonic() > deadline:
            return reading
        time.sleep(2)
