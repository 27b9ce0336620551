"""What the chaos soak (bench/chaos.py) runs its load on, and the chaos: the stack's processes,
restartable one by one, and the actions that kill them.

The chaos: every 8-12 s, one of SIGKILL a worker (a new one starts), SIGKILL a front (restarted on
its port), SIGKILL the Redis primary (the sentinels promote the replica; the old one comes back as
a replica), each once in every three actions, in a random order.
"""

from __future__ import annotations

import itertools
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis

from harness.redis_sentinel import SentinelRedis
from harness.services import Service, start_front, start_synthetic_worker, wait_workers

WORKERS, FRONTS, SLOTS, TOKENS_PER_SECOND = 2, 2, 4, 40
MAX_ATTEMPTS = 10  # runs a job may start: repeated kills must not fail jobs
CHAOS_EVERY = (8.0, 12.0)  # seconds between two actions
# Sentinel's down-after-milliseconds. At 1 s (SentinelRedis's default) a sentinel on a loaded 2-core
# machine can call the primary it has just promoted down and fail over again, onto the old primary
# that has just come back empty and not yet synced: Redis then loses every job (seen in this bench).
DOWN_AFTER_MS = 3000

MODEL = "synth"


def settings(result_ttl: int) -> dict[str, str]:
    return {
        "STREAMQ_LEASE_SECONDS": "3",
        "STREAMQ_PING_INTERVAL": "1",
        "STREAMQ_KEY_RATE_LIMIT": "",
        "STREAMQ_KEY_MAX_CONCURRENT": "0",
        "STREAMQ_RESULT_TTL": str(result_ttl),
        "STREAMQ_DRAIN_SECONDS": "0",
        "STREAMQ_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
    }


class Stack:
    """The processes, restartable one by one; every service ever started is kept for its log."""

    def __init__(self, workdir: Path, result_ttl: int) -> None:
        self.logdir = workdir / "chaos-logs"
        self.logdir.mkdir(parents=True, exist_ok=True)
        self.result_ttl = result_ttl
        self.settings = settings(result_ttl)
        self.ha = SentinelRedis(down_after_ms=DOWN_AFTER_MS)
        self.env = {**self.ha.env(), **self.settings}
        self.services: list[Service] = []
        self.workers: list[Service] = []
        self.fronts: list[Service] = []
        self.urls: list[str] = []
        self._names = itertools.count()
        self._restarts = itertools.count(1)
        self._watching = threading.Event()  # set: the sentinel watchers stop

    def start(self) -> None:
        self.watch_sentinels()
        self.workers = [self._worker() for _ in range(WORKERS)]
        for i in range(FRONTS):
            front, url = start_front(self.env, self.logdir, f"chaos-front{i}-0", log_level="info")
            self.services.append(front)
            self.fronts.append(front)
            self.urls.append(url)
        wait_workers(self.urls[0], WORKERS)

    def _worker(self) -> Service:
        name = f"chaos-w{next(self._names)}"
        worker = start_synthetic_worker(self.env, self.logdir, MODEL, name, TOKENS_PER_SECOND, SLOTS)
        self.services.append(worker)
        return worker

    def kill_worker(self, rng: random.Random) -> str:
        i = rng.randrange(len(self.workers))
        victim = self.workers[i]
        victim.stop(signal.SIGKILL)
        self.workers[i] = self._worker()
        return f"SIGKILL worker {victim.name}, started {self.workers[i].name}"

    def kill_front(self, rng: random.Random) -> str:
        i = rng.randrange(len(self.fronts))
        victim = self.fronts[i]
        victim.stop(signal.SIGKILL)
        port = int(self.urls[i].rsplit(":", 1)[1])
        name = f"chaos-front{i}-{next(self._restarts)}"
        front, _ = start_front(self.env, self.logdir, name, log_level="info", port=port)
        self.services.append(front)
        self.fronts[i] = front
        return f"SIGKILL front {victim.name}, restarted on port {port}"

    def close(self) -> None:
        self._watching.set()
        for service in reversed(self.services):
            service.stop(timeout=10)
        self.ha.close()

    def watch_sentinels(self) -> None:
        """Keep every sentinel's events (+sdown, +switch-master, +convert-to-slave, ...) in the
        log folder's sentinel-events.log: what the sentinels did, beside the failovers asked."""
        for port in self.ha.sentinel_ports:
            threading.Thread(target=self._watch, args=(port,), daemon=True).start()

    def _watch(self, port: int) -> None:
        pubsub = redis.Redis(port=port, decode_responses=True).pubsub(ignore_subscribe_messages=True)
        with open(self.logdir / "sentinel-events.log", "a") as log:
            pubsub.psubscribe("*")
            while not self._watching.is_set():
                message = pubsub.get_message(timeout=1.0)
                if message is not None:
                    now = time.strftime("%H:%M:%S") + f".{int(time.time() * 1000) % 1000:03d}"
                    log.write(f"{now} sentinel {port}: {message['channel']} {message['data']}\n")
                    log.flush()
            pubsub.close()

    def sentinel_events(self, channel: str) -> list[str]:
        path = self.logdir / "sentinel-events.log"
        lines = path.read_text().splitlines() if path.exists() else []
        return [line for line in lines if f": {channel} " in line]

    def log_lines(self, pattern: str, name: str | None = None) -> list[str]:
        """The lines of every process's log (or ``name``'s) that hold ``pattern``, with the process."""
        services = [s for s in self.services if name in (None, s.name)]
        return [f"{s.name}: {line}" for s in services for line in s.log().splitlines() if pattern in line]


@dataclass
class Chaos:
    worker_kills: int = 0
    front_kills: int = 0
    failovers: list[tuple[float, float]] = field(default_factory=list)  # (monotonic at the kill, promoted in)
    actions: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def run(self, stack: Stack, rng: random.Random, seconds: float) -> None:
        """In the main thread: a process started in another thread gets its PR_SET_PDEATHSIG
        (redis-server's nodes do) when that thread ends, not when this process does."""
        deck: list[str] = []
        began = time.monotonic()
        while (pause := rng.uniform(*CHAOS_EVERY)) < began + seconds - time.monotonic():
            time.sleep(pause)
            if not deck:  # each action once in every three, in a random order
                deck = ["worker", "front", "redis"]
                rng.shuffle(deck)
            action, at = deck.pop(), time.monotonic()
            try:
                if action == "worker":
                    self.worker_kills += 1
                    what = stack.kill_worker(rng)
                elif action == "front":
                    self.front_kills += 1
                    what = stack.kill_front(rng)
                else:
                    old, new, took = stack.ha.fail_over()
                    self.failovers.append((at, took))
                    stack.ha.wait_ready(60)  # the old primary back as a synced replica: the next one is safe
                    what = f"Redis failover {old} -> {new}, promoted in {took:.2f} s"
                self.actions.append(f"{at - began:6.1f} s  {what} ({time.monotonic() - at:.1f} s)")
            except Exception as exc:
                self.problems.append(f"{at - began:.1f} s, {action}: {type(exc).__name__}: {exc}")
