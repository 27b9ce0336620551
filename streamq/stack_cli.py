"""``streamq up`` (the whole stack on this machine) and ``streamq status`` (what Redis says about it).

The parsers only: the launcher (streamq/launcher.py) and the tables (streamq/status_report.py) are
imported when their command runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from pydantic import ValidationError

from shared.cli_options import DEVICES, DTYPES, ENGINE_HELP, ENGINES, INSECURE_HELP, with_options
from shared.settings import Settings
from shared.settings_loading import load_settings, refuse_to_start


def add_commands(sub: Any) -> None:
    """Add ``up`` and ``status`` to the ``streamq`` command's subparsers."""
    up = sub.add_parser(
        "up", help="run Redis (private, unless STREAMQ_REDIS_URL is set), the front and workers"
    )
    up.add_argument(
        "--host", default="127.0.0.1", help="the front's address (default 127.0.0.1; another needs API keys)"
    )
    up.add_argument("--port", type=int, default=8000, help="the front's port (default 8000)")
    up.add_argument("--model", help="hub name or local folder (default: the tiny demo model)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.add_argument("--device", choices=DEVICES)
    up.add_argument("--dtype", choices=DTYPES)
    up.add_argument("--engine", choices=ENGINES, help=ENGINE_HELP)
    up.add_argument("--insecure", action="store_true", default=None, help=INSECURE_HELP)

    status = sub.add_parser("status", help="queues, workers and jobs, from Redis (a table)")
    status.add_argument("--redis-url", help="default: STREAMQ_REDIS_URL")


def run(args: argparse.Namespace, front_may_start: Callable[[Settings, str], bool]) -> int:
    """Run ``up`` or ``status``. ``front_may_start`` (the front's own check of its keys and bind
    address, which says why not) lets ``up`` refuse before it starts anything."""
    settings = load_settings()
    try:
        if args.command == "status":
            from streamq.status_report import print_status

            return print_status(with_options(settings, redis_url=args.redis_url))
        settings = with_options(
            settings, device=args.device, dtype=args.dtype, engine=args.engine, insecure=args.insecure
        )
    except ValidationError as exc:
        return refuse_to_start(exc, {"redis_url": "--redis-url"} if args.command == "status" else None)
    from streamq.launcher import run_up

    if not front_may_start(settings, args.host):
        return 2
    return run_up(settings, args.host, args.port, args.model, args.workers)
