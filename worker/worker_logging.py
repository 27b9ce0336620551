"""A worker process's logging: streamq's format (STREAMQ_LOG_FORMAT) for its own lines, the
libraries' it loads (transformers) and RQ's, whichever way the worker was started."""

from __future__ import annotations

import logging

from shared.log_format import configure_logging
from shared.settings import Settings


def _transformers_logs_through_ours() -> None:
    """transformers logs through its own handler and draws progress bars: with JSON logs, its
    records go through the root logger like every other, and no bar is drawn."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def configure_worker_logging(settings: Settings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    if settings.log_format == "json" and settings.backend == "model":
        _transformers_logs_through_ours()


RQ_LOGGERS = ("rq.worker", "rq.job")


def rq_logs_through_ours(settings: Settings) -> None:
    """``configure_worker_logging`` in a worker that RQ's own command started: `rq worker` gave
    RQ's loggers handlers of their own and the level info, which would leave streamq's lines
    unwritten and RQ's in RQ's format at info; RQ's lines now go through streamq's handler, at
    STREAMQ_LOG_LEVEL (the root's). RQ's start must then be given no level (``bootstrap``'s
    ``logging_level=None``), or it sets info again."""
    configure_worker_logging(settings)
    for name in RQ_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)
