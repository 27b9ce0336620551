"""``streamq worker``: one worker process serving one model from its RQ queue (see ``slot_pool``)."""

from __future__ import annotations

from shared.log_format import configure_logging
from shared.settings import Settings
from worker.slot_pool import SlotPool


def run_worker(settings: Settings, name: str | None = None, burst: bool = False) -> int:
    configure_logging(settings.log_format)
    return SlotPool(settings, name=name, burst=burst).run()
