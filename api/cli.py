"""``streamq api``: the HTTP front under uvicorn. Nothing here imports the app until it runs."""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from shared.cli_options import INSECURE_HELP, with_options
from shared.parent_death import die_with_parent
from shared.ports import port_in_use
from shared.settings import Settings
from shared.settings_loading import load_settings, refuse_to_start

if TYPE_CHECKING:
    from fastapi import FastAPI

    from api.auth import ApiKeys


def add_commands(sub: Any) -> None:
    """Add ``api`` to the ``streamq`` command's subparsers."""
    api = sub.add_parser("api", help="run the HTTP front (uvicorn)")
    api.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    api.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    api.add_argument(
        "--log-level",
        default=None,
        type=str.lower,
        choices=("critical", "error", "warning", "info", "debug", "trace"),
        help="the front's and uvicorn's log level (default: STREAMQ_LOG_LEVEL, info)",
    )
    api.add_argument("--insecure", action="store_true", default=None, help=INSECURE_HELP)
    api.add_argument(
        "--workers",
        type=int,
        default=None,
        help="front processes sharing the port (STREAMQ_API_WORKERS; default 1): about one per core",
    )


def front_settings(args: argparse.Namespace) -> Settings | None:
    """The settings from the environment with the command line's options, checked alike (an
    option bypasses no bound); None (after saying why) when one is bad."""
    try:
        return with_options(load_settings(), insecure=args.insecure, api_workers=args.workers)
    except ValidationError as exc:
        refuse_to_start(exc)
        return None


def front_keys(settings: Settings, host: str) -> ApiKeys | None:
    """The front's API keys, read once; None (after saying why) when the front must not start:
    keys that cannot be used, a bad rate limit, or no keys on a non-loopback address."""
    from api.auth import ApiKeys, open_bind_refusal
    from api.quotas import parse_rate_limit

    try:
        keys = ApiKeys.from_settings(settings)
        parse_rate_limit(settings.key_rate_limit)
    except ValueError as exc:
        reason: str | None = str(exc)
    else:
        reason = open_bind_refusal(settings, keys, host)
    if reason is not None:
        print(f"streamq: refusing to start: {reason}", file=sys.stderr)
        return None
    return keys


def front_may_start(settings: Settings, host: str) -> bool:
    """Whether a front with these settings would start on ``host`` (if not, it says why)."""
    return front_keys(settings, host) is not None


MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own: where processes share metrics


@contextlib.contextmanager
def front_processes(settings: Settings) -> Iterator[str]:
    """What ``uvicorn --workers N`` needs: the app factory's import path, with the environment
    its processes read (each builds its app from the environment, as ``create_app()`` does).
    The options given on the command line go into it, and a directory where prometheus_client
    keeps each process's counters so that any process's ``/metrics`` shows them all; it is
    removed when the front stops."""
    if settings.insecure:
        os.environ["STREAMQ_INSECURE"] = "1"
    os.environ["STREAMQ_API_WORKERS"] = str(settings.api_workers)
    made = None
    if not os.environ.get(MULTIPROC_ENV):
        made = tempfile.mkdtemp(prefix="streamq-front-metrics-")
        os.environ[MULTIPROC_ENV] = made
    try:
        yield "api.cli:front_process_app"
    finally:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)


def front_process_app() -> FastAPI:
    """uvicorn's app factory in each process of a front of several: ``create_app()``, in a
    process that stops (SIGTERM, gracefully) when the front's parent process ends, however it
    ends: children of a killed parent would otherwise go on serving its port, unmanaged."""
    from api.app import create_app

    parent = multiprocessing.parent_process()
    if parent is not None and sys.platform.startswith("linux"):
        die_with_parent()
        if os.getppid() != parent.pid:  # it ended before the line above
            os.kill(os.getpid(), signal.SIGTERM)
    return create_app(settle_heap_at_start=True, end_streams_on_stop=True)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from shared.log_format import logging_config

    settings = front_settings(args)
    if settings is None:
        return 2
    keys = front_keys(settings, args.host)
    if keys is None:
        return 2
    if port_in_use(args.host, args.port):  # uvicorn would say so only after its startup, and exit 3
        print(
            f"streamq api: port {args.port} on {args.host} is in use; choose another with --port",
            file=sys.stderr,
        )
        return 2
    # Open SSE streams would hold a stopping front for as long as their jobs run: cut them
    # after this grace; their clients re-attach elsewhere with Last-Event-ID.
    level = args.log_level or settings.log_level
    common: dict[str, Any] = {
        "host": args.host,
        "port": args.port,
        "log_level": level,
        "log_config": logging_config(settings.log_format, level),
        "timeout_graceful_shutdown": settings.shutdown_grace,
        "timeout_keep_alive": settings.keep_alive,
    }
    if settings.api_workers == 1:
        from api.app import create_app

        uvicorn.run(create_app(settings, keys, settle_heap_at_start=True, end_streams_on_stop=True), **common)
        return 0
    with front_processes(settings) as factory:
        uvicorn.run(factory, factory=True, workers=settings.api_workers, **common)
    return 0
