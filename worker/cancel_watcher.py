"""Hears cancel requests at once: a pub/sub listener that flags the jobs this process runs.

The flag in the job's hash (read at every flush) is the durable copy of a cancel; this
listener only makes it take effect at the very next generation step.
"""

from __future__ import annotations

import logging
import threading

import redis

from shared import keys
from shared.background import BackgroundThread

log = logging.getLogger("streamq.worker")


class CancelWatcher(BackgroundThread):
    thread_name = "streamq-cancel-watcher"

    def __init__(self, connection: redis.Redis) -> None:
        super().__init__()
        self._redis = connection
        # Runs of a job this process holds: two at once when it took back a job whose lease lapsed
        # while it stalled, until the earlier run finds it lost.
        self._watched: dict[str, list[threading.Event]] = {}
        self._lock = threading.Lock()

    def watch(self, job_id: str) -> threading.Event:
        """An event that is set when a cancel of ``job_id`` is announced."""
        event = threading.Event()
        with self._lock:
            self._watched.setdefault(job_id, []).append(event)
        return event

    def unwatch(self, job_id: str, event: threading.Event) -> None:
        """Stop watching for the run that ``watch`` gave ``event``."""
        with self._lock:
            events = self._watched.get(job_id, [])
            if event in events:
                events.remove(event)
            if not events:
                self._watched.pop(job_id, None)

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(keys.CANCEL_CHANNEL)
                backoff = 0.5
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.5)
                    if message and message["type"] == "message":
                        job_id = message["data"]
                        job_id = job_id.decode() if isinstance(job_id, bytes) else str(job_id)
                        with self._lock:
                            events = list(self._watched.get(job_id, []))
                        for event in events:
                            event.set()
            except redis.RedisError as exc:
                log.warning("cancel listener lost Redis (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            except Exception:  # a bug must not end the listener (cancels would wait for a flush)
                log.exception("cancel listener failed; listening again in %.1fs", backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
            finally:
                pubsub.close()
