"""``streamq worker``: one process, one loaded model, one engine, one dispatcher for K slots.

The pool builds the process's runtime (``worker.runtime.build_runtime``: model, engine and the
threads that serve it) and a dispatcher (``worker.dispatcher``) that takes jobs off the model's
queue whenever a slot is free, records them in RQ as RQ's worker would, and runs each in a
thread of its own while the engine generates, so the process never takes more jobs than it has
slots and ``rq info`` shows every job truthfully. The main thread, which loaded the model, runs
the engine and takes the signals; a manager thread stops the rest:

- first SIGTERM / SIGINT: stop taking jobs, let running ones finish for ``drain_seconds``;
- second signal, or the drain time is up: stop the engine; jobs still running go back to the
  front of their queue, for another worker to continue.
"""

from __future__ import annotations

import contextlib
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

from shared.heap import release_heap, settle_heap
from shared.redis_connect import RedisTarget
from shared.settings import Settings
from worker.dispatcher import IDLE_WAIT, Dispatcher
from worker.engine_setup import MAX_AUTO_SLOTS, SYNTHETIC_SLOTS
from worker.runtime import WorkerRuntime, build_runtime

log = logging.getLogger("streamq.worker")

SWITCH_INTERVAL = 0.0005  # seconds
JOBS_AT_STOP = 10.0  # seconds the stopping worker waits for its job threads to end (each hands back)


def worker_connection(settings: Settings) -> redis.Redis:
    return RedisTarget.of(settings).client(
        # The dispatcher blocks on its queue for IDLE_WAIT at most; past that and a command's
        # allowance, a reply that never comes (a primary whose host died without closing the
        # connection) is given up on, not waited for the minutes TCP takes to say so.
        socket_timeout=IDLE_WAIT + settings.redis_socket_timeout,
        socket_connect_timeout=settings.redis_socket_timeout,
        # The dispatcher holds one while it waits on the queue; each running job borrows one now
        # and then (its start, its end in RQ); the engine's threads need a few more.
        max_connections=2 * (settings.slots or max(MAX_AUTO_SLOTS, SYNTHETIC_SLOTS)) + 32,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), retries=3),
        retry_on_error=[redis.ConnectionError, redis.TimeoutError],
        client_name="streamq-worker",  # how its connections show in CLIENT LIST
    )


class SlotPool:
    def __init__(self, settings: Settings, name: str | None = None, burst: bool = False) -> None:
        self.settings = settings
        self.name = name or f"{socket.gethostname()}.{os.getpid()}"
        self.burst = burst
        self.connection = worker_connection(settings)
        self._stop = threading.Event()
        self._force = threading.Event()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop.is_set():
            log.warning("second stop signal: stopping now")
            self._force.set()
        else:
            log.info("stop signal: taking no new jobs, draining for up to %.0fs", self.settings.drain_seconds)
        self._stop.set()

    def run(self) -> int:
        self.connection.ping()  # an unreachable Redis is said before the model loads (minutes)
        runtime = build_runtime(self.settings, self.connection, self.name)
        runtime.start(engine_thread=False)  # the engine runs here, where the model was loaded
        # The engine holds the GIL between torch calls; hand it over more often than Python's
        # default 5 ms, so that the dispatcher takes new jobs (and the publisher writes) promptly.
        sys.setswitchinterval(SWITCH_INTERVAL)
        # The model and the engine, loaded now, stay out of garbage collections.
        settle_heap(self.settings)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        slots = runtime.engine.slots
        device = runtime.backend.device
        log.info(
            "worker %s serves %s %s with %d slots",
            self.name,
            runtime.served_name,
            "(synthetic text, no model)" if device == "none" else f"on {device}",
            slots,
        )
        dispatcher = Dispatcher(self.connection, runtime, slots, self.name, self.settings, burst=self.burst)
        runtime.on_forgotten.append(dispatcher.data_lost)
        taking = threading.Thread(target=dispatcher.run, name="streamq-dispatcher", daemon=True)
        taking.start()
        manager = threading.Thread(
            target=self._manage, args=(runtime, dispatcher, taking), name="streamq-slots", daemon=True
        )
        manager.start()
        healthy = True
        try:
            runtime.engine.run()
        except Exception:
            healthy = False  # logged by the engine; the process exits non-zero for its supervisor
        finally:
            self._stop.set()
            dispatcher.stop_taking()
            manager.join(timeout=self.settings.drain_seconds + 10)
            # A job still starting when the engine stopped is handed back by its own thread,
            # through the publisher: the publisher stops after the job threads have ended.
            dispatcher.wait_idle(JOBS_AT_STOP)
            runtime.stop()  # what is left is written; the worker leaves the lists
            taking.join(timeout=10)
            release_heap()
        return 0 if healthy else 1

    def _manage(self, runtime: WorkerRuntime, dispatcher: Dispatcher, taking: threading.Thread) -> None:
        """Wait for a stop (or a burst run's end); then drain and stop the engine."""
        while not self._stop.wait(0.5) and taking.is_alive():
            pass
        dispatcher.stop_taking()
        # Said at once: its free slots take nothing now (the fronts' estimates, /scaling, status).
        runtime.heartbeat.publish(draining="1")
        with contextlib.suppress(redis.RedisError):
            runtime.heartbeat.beat()
        deadline = time.monotonic() + self.settings.drain_seconds
        # A take under way (a wait on the queue) ends first: a job it brings is started and
        # counted before the drain is measured, never stopped before its start.
        dispatcher.taking_ended.wait(IDLE_WAIT + 10)
        while dispatcher.running() and time.monotonic() < deadline and not self._force.is_set():
            time.sleep(0.1)
        runtime.engine.request_stop()  # jobs still running go back to their queue
