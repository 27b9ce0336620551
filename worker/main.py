"""``streamq worker``: one worker process serving one model from its RQ queue (see ``slot_pool``)."""

from __future__ import annotations

from shared.settings import Settings
from worker.slot_pool import SlotPool
from worker.worker_logging import configure_worker_logging


def run_worker(settings: Settings, name: str | None = None, burst: bool = False) -> int:
    configure_worker_logging(settings)
    return SlotPool(settings, name=name, burst=burst).run()
