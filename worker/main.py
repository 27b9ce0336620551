"""``streamq worker``: one worker process serving one model from its RQ queue (see ``slot_pool``)."""

from __future__ import annotations

import logging

from shared.settings import Settings
from worker.slot_pool import SlotPool


def run_worker(settings: Settings, name: str | None = None, burst: bool = False) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    return SlotPool(settings, name=name, burst=burst).run()
