"""``streamq worker``: one process, one loaded model, one engine, K slot threads.

The pool builds the process's runtime (``worker.runtime.build_runtime``: model, engine and the
threads that serve it) and hands it to each slot. Each slot is an RQ worker (a ``SlotWorker``,
see ``worker.rq_worker``) running in its own thread: it takes one job at a time from the
model's queue and waits while the engine runs it, so RQ's registries and ``rq info`` show
every job truthfully, and the process never takes more jobs than it has slots. The main
thread, which loaded the model, runs the engine and takes the signals; a manager thread keeps
the slots going:

- first SIGTERM / SIGINT: stop taking jobs, let running ones finish for ``drain_seconds``;
- second signal, or the drain time is up: stop the engine; jobs still running go back to the
  front of their queue, for another worker to continue.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from types import FrameType

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from shared.redis_connect import RedisTarget
from shared.settings import Settings
from worker.engine_setup import MAX_AUTO_SLOTS, SYNTHETIC_SLOTS
from worker.rq_worker import SlotWorker
from worker.runtime import WorkerRuntime, build_runtime

log = logging.getLogger("streamq.worker")

SWITCH_INTERVAL = 0.0005  # seconds


def worker_connection(settings: Settings) -> redis.Redis:
    return RedisTarget.of(settings).client(
        socket_timeout=None,  # slots block on their queue; RQ sets its own timeouts
        socket_connect_timeout=settings.redis_socket_timeout,
        # Each slot holds one connection while it waits on the queue, and borrows another now
        # and then (RQ's heartbeats, job bookkeeping); the engine's threads need a few more.
        max_connections=2 * (settings.slots or max(MAX_AUTO_SLOTS, SYNTHETIC_SLOTS)) + 32,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
    )


class SlotPool:
    def __init__(self, settings: Settings, name: str | None = None, burst: bool = False) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}.{os.getpid()}"
        self.burst = burst
        self.connection = worker_connection(settings)
        self._stop = threading.Event()
        self._force = threading.Event()
        self._slots: dict[int, tuple[SlotWorker, threading.Thread]] = {}
        self._generation = 0

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop.is_set():
            log.warning("second stop signal: stopping now")
            self._force.set()
        else:
            log.info("stop signal: taking no new jobs, draining for up to %.0fs", self.settings.drain_seconds)
        self._stop.set()

    def run(self) -> int:
        runtime = build_runtime(self.settings, self.connection, self.name)
        runtime.start(engine_thread=False)  # the engine runs here, where the model was loaded
        # The engine holds the GIL between torch calls; hand it over more often than Python's
        # default 5 ms, so that slot threads take new jobs (and the publisher writes) promptly.
        sys.setswitchinterval(SWITCH_INTERVAL)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        slots = runtime.engine.slots
        log.info(
            "worker %s serves %s on %s with %d slots",
            self.name,
            runtime.served_name,
            runtime.backend.device,
            slots,
        )
        for index in range(slots):
            self._start_slot(index, runtime)
        manager = threading.Thread(target=self._manage, args=(runtime,), name="streamq-slots", daemon=True)
        manager.start()
        healthy = True
        try:
            runtime.engine.run()
        except Exception:
            healthy = False  # logged by the engine; the process exits non-zero for its supervisor
        finally:
            self._stop.set()
            manager.join(timeout=self.settings.drain_seconds + 10)
            runtime.stop()  # what is left is written; the worker leaves the lists
            for _worker, thread in self._slots.values():
                thread.join(timeout=5)
        return 0 if healthy else 1

    def _manage(self, runtime: WorkerRuntime) -> None:
        """Keep the slots running until a stop; then drain and stop the engine."""
        try:
            self._supervise(runtime)
        finally:
            for worker, _thread in self._slots.values():
                worker.stop_taking_jobs()
            deadline = time.monotonic() + self.settings.drain_seconds
            while (
                any(t.is_alive() for _w, t in self._slots.values())
                and time.monotonic() < deadline
                and not self._force.is_set()
            ):
                time.sleep(0.1)
            runtime.engine.request_stop()  # jobs still running go back to their queue

    def _start_slot(self, index: int, runtime: WorkerRuntime) -> None:
        # A restarted slot gets a new name: its old RQ record may not have been removed (Redis
        # was away when it stopped), and RQ refuses a second live worker of the same name.
        self._generation += 1
        name = (
            f"{self.name}.{index}" if index not in self._slots else f"{self.name}.{index}-{self._generation}"
        )
        worker = SlotWorker(
            None,
            connection=self.connection,
            settings=self.settings,
            runtime=runtime,
            name=name,
            maintenance_interval=self.settings.maintenance_interval,
        )
        thread = threading.Thread(
            target=worker.work,
            kwargs={"burst": self.burst, "logging_level": "INFO"},
            name=f"streamq-slot-{index}",
            daemon=True,
        )
        self._slots[index] = (worker, thread)
        thread.start()

    def _supervise(self, runtime: WorkerRuntime) -> None:
        """Wait for a stop; restart a slot whose RQ loop ended on its own (e.g. Redis went away)."""
        while not self._stop.wait(0.5):
            for index, (_worker, thread) in list(self._slots.items()):
                if thread.is_alive():
                    continue
                if self.burst:
                    del self._slots[index]
                else:
                    log.warning("slot %d stopped; starting it again", index)
                    time.sleep(1.0)
                    self._start_slot(index, runtime)
            if self.burst and not self._slots:
                return
