"""A worker process's logging: streamq's format (STREAMQ_LOG_FORMAT) and level
(STREAMQ_LOG_LEVEL) for its own lines, the libraries' it loads (transformers) and RQ's,
whichever way the worker was started (``streamq worker`` or ``rq worker -w``)."""

from __future__ import annotations

import logging

from shared.log_format import configure_logging
from shared.settings import Settings

RQ_LOGGERS = ("rq.worker", "rq.job")


def _transformers_logs_through_ours(quiet: bool) -> None:
    """transformers logs through its own handler: with JSON logs its records go through the root
    logger like every other. Its progress bars (loading weights) are not drawn in JSON logs or
    above info (where they are, HF_HUB_DISABLE_PROGRESS_BARS still turns them off)."""
    from transformers.utils import logging as hf_logging

    if quiet:
        hf_logging.disable_progress_bar()
    hf_logging.disable_default_handler()
    hf_logging.enable_propagation()


def _rq_logs_through_ours() -> None:
    """RQ sets its loggers at info when imported, and `rq worker` gives them handlers of their
    own: that would write RQ's lines in RQ's format at info whatever STREAMQ_LOG_LEVEL says. They
    now go through streamq's handler at the root's level. RQ's start must then be given no level
    (``bootstrap``'s ``logging_level=None``), or it sets info again."""
    for name in RQ_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
        logger.setLevel(logging.NOTSET)


def configure_worker_logging(settings: Settings) -> None:
    configure_logging(settings.log_format, settings.log_level)
    _rq_logs_through_ours()
    if settings.backend == "model":
        quiet = settings.log_format == "json" or settings.log_level not in ("debug", "info")
        _transformers_logs_through_ours(quiet)
