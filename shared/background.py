"""Helper threads (a worker's heartbeat, cancel listener, prompt counter and leases; the janitor and
the epoch watch of workers and fronts) start and stop alike."""

from __future__ import annotations

import threading


class BackgroundThread:
    """A daemon thread running ``_run`` until ``stop``; ``_run`` polls ``self._stop``."""

    thread_name = "streamq-background"

    def __init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the thread to stop, without waiting (so that several stop at once)."""
        self._stop.set()

    def stop(self) -> None:
        self.request_stop()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        raise NotImplementedError
