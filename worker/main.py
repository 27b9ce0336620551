"""``streamq worker``: one worker process serving one model from its RQ queue (see ``slot_pool``)."""

from __future__ import annotations

from shared.log_format import configure_logging
from shared.settings import Settings
from worker.slot_pool import SlotPool


def _transformers_logs_through_ours() -> None:
    """transformers logs through its own handler and draws progress bars: with JSON logs, its
    records go through the root logger like every other, and no bar is drawn."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def run_worker(settings: Settings, name: str | None = None, burst: bool = False) -> int:
    configure_logging(settings.log_format)
    if settings.log_format == "json" and settings.backend == "model":
        _transformers_logs_through_ours()
    return SlotPool(settings, name=name, burst=burst).run()
