"""``streamq api``: the HTTP front under uvicorn. Nothing here imports the app until it runs."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from shared.cli_options import INSECURE_HELP, with_options
from shared.settings import Settings, load_settings

if TYPE_CHECKING:
    from api.auth import ApiKeys


def add_commands(sub: Any) -> None:
    """Add ``api`` to the ``streamq`` command's subparsers."""
    api = sub.add_parser("api", help="run the HTTP front (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--log-level", default="info")
    api.add_argument("--insecure", action="store_true", default=None, help=INSECURE_HELP)


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


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from shared.log_format import logging_config

    settings = with_options(load_settings(), insecure=args.insecure)
    keys = front_keys(settings, args.host)
    if keys is None:
        return 2
    uvicorn.run(
        create_app(settings, keys),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        log_config=logging_config(settings.log_format, args.log_level),
        # Open SSE streams would hold a stopping front for as long as their jobs run: cut
        # them after this grace; their clients re-attach elsewhere with Last-Event-ID.
        timeout_graceful_shutdown=settings.shutdown_grace,
    )
    return 0
