"""Log output for every streamq process: plain lines, or one JSON object per line.

``STREAMQ_LOG_FORMAT=json`` makes each record a JSON object with ``ts``, ``level``, ``logger``
and ``message``, plus the structured fields a call passes in ``extra`` (a job's lifecycle
lines carry ``event``, ``job_id``, ``model``, ``worker`` and timings; see ``job_fields``).
Nothing here logs request bodies: prompts and API keys never reach a log line.
"""

from __future__ import annotations

import json
import logging
import logging.config
from datetime import UTC, datetime
from typing import Any

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "color_message",  # uvicorn's copy of the message with terminal colours
}
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_") and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str, ensure_ascii=False)


class LocalProbes(logging.Filter):
    """Leaves out uvicorn's access lines for health probes from this host (``streamq up`` polls
    ``/readyz`` while the workers load; a container's own healthcheck polls too). A probe from
    elsewhere (a kubelet, a load balancer) is logged as any request."""

    PATHS = frozenset({"/healthz", "/readyz"})

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if not isinstance(args, tuple) or len(args) < 3:
            return True
        client, path = str(args[0]), str(args[2])
        local = client.startswith(("127.", "::1", "[::1]", "localhost"))
        return not (local and path.split("?", 1)[0] in self.PATHS)


def job_fields(event: str, job_id: str, model: str, **timings: Any) -> dict[str, Any]:
    """``extra`` for a job's lifecycle line: queued, started, finished, failed, canceled, requeued."""
    return {"event": event, "job_id": job_id, "model": model, **timings}


def logging_config(log_format: str, level: str = "INFO") -> dict[str, Any]:
    """A ``dictConfig`` for the root logger and uvicorn's loggers (uvicorn takes it as ``log_config``)."""
    formatter: dict[str, Any] = (
        {"()": JsonFormatter}
        if log_format == "json"
        else {"format": TEXT_FORMAT, "datefmt": "%Y-%m-%dT%H:%M:%S"}
    )
    level = level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"streamq": formatter},
        "filters": {"local_probes": {"()": LocalProbes}},
        "handlers": {
            "stderr": {"class": "logging.StreamHandler", "formatter": "streamq", "stream": "ext://sys.stderr"}
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            name: {"handlers": [], "level": level, "propagate": True}
            | ({"filters": ["local_probes"]} if name == "uvicorn.access" else {})
            for name in ("uvicorn", "uvicorn.error", "uvicorn.access")
        },
    }


def configure_logging(log_format: str, level: str = "INFO") -> None:
    logging.config.dictConfig(logging_config(log_format, level))
