"""The ``streamq`` command: ``up``, ``api``, ``worker``, ``status``, ``make-tiny-model``.

Heavy imports happen inside each command, so ``streamq api`` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from shared.settings import Settings, load_settings

if TYPE_CHECKING:
    from api.auth import ApiKeys


def _with(settings: Settings, **changes: object) -> Settings:
    """The settings with the options given on the command line (None = not given)."""
    return settings.model_copy(update={k: v for k, v in changes.items() if v is not None})


_INSECURE_HELP = "serve without API keys on a non-loopback address (STREAMQ_INSECURE=1)"
ENGINES = ["auto", "transformers", "vllm"]
_ENGINE_HELP = "the worker's engine (STREAMQ_ENGINE; auto: vLLM on a GPU when installed, else transformers)"


def _front_keys(settings: Settings, host: str) -> ApiKeys | None:
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up", help="run Redis (private, unless STREAMQ_REDIS_URL is set), the front and workers"
    )
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--model", help="hub name or local folder (default: the tiny demo model)")
    up.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    up.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    up.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    up.add_argument("--engine", choices=ENGINES, help=_ENGINE_HELP)
    up.add_argument("--insecure", action="store_true", default=None, help=_INSECURE_HELP)

    api = sub.add_parser("api", help="run the HTTP front (uvicorn)")
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=8000)
    api.add_argument("--log-level", default="info")
    api.add_argument("--insecure", action="store_true", default=None, help=_INSECURE_HELP)

    worker = sub.add_parser("worker", help="run a worker that serves one model")
    worker.add_argument("--model", help="hub name or local folder (default: STREAMQ_MODEL)")
    worker.add_argument("--served-name", help="the model name clients use (default: folder or hub name)")
    worker.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    worker.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    worker.add_argument("--engine", choices=ENGINES, help=_ENGINE_HELP)
    worker.add_argument("--trust-remote-code", action="store_true", default=None, help="needed for ChatGLM")
    worker.add_argument("--name", help="worker name (default: random)")
    worker.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    worker.add_argument("--slots", type=int, help="jobs run at once (default: 8 on CPU, what fits on a GPU)")
    worker.add_argument(
        "--backend", choices=["model", "synthetic"], help="synthetic: no model, paced tokens (load tests)"
    )
    worker.add_argument("--tokens-per-second", type=float, help="pace of the synthetic backend")

    status = sub.add_parser("status", help="queues, workers and jobs, from Redis (a table)")
    status.add_argument("--redis-url", help="default: STREAMQ_REDIS_URL")

    tiny = sub.add_parser("make-tiny-model", help="build a small random-weight chat model into DIR")
    tiny.add_argument("dir")
    tiny.add_argument("--shape", default="tiny", help="tiny (default), tiny-hd64 (for vLLM) or qwen2.5-0.5b")

    from client.chat_cli import add_commands  # `chat` and `ask`: the terminal clients

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("chat", "ask"):
        from client.chat_cli import run

        return run(args)
    settings = load_settings()
    if args.command == "api":
        import uvicorn

        from api.app import create_app
        from shared.log_format import logging_config

        settings = _with(settings, insecure=args.insecure)
        keys = _front_keys(settings, args.host)
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
    if args.command == "worker":
        from worker.main import run_worker

        settings = _with(
            settings,
            model=args.model,
            served_name=args.served_name,
            device=args.device,
            dtype=args.dtype,
            engine=args.engine,
            trust_remote_code=args.trust_remote_code,
            slots=args.slots,
            backend=args.backend,
            synthetic_tokens_per_second=args.tokens_per_second,
        )
        if settings.backend == "model" and not settings.model:
            print("streamq worker: give --model NAME_OR_PATH (or set STREAMQ_MODEL)", file=sys.stderr)
            return 2
        try:
            return run_worker(settings, name=args.name, burst=args.burst)
        except (OSError, ValueError) as exc:  # a model that cannot be found or loaded
            print(f"streamq worker: cannot serve {settings.model}: {exc}", file=sys.stderr)
            return 1
    if args.command == "status":
        from shared.status_report import print_status

        return print_status(_with(settings, redis_url=args.redis_url))
    if args.command == "make-tiny-model":
        from worker.tiny_model import make_tiny_model

        path = make_tiny_model(args.dir, shape=args.shape)
        print(f"tiny model written to {path}")
        return 0
    if args.command == "up":
        from shared.launcher import run_up

        settings = _with(
            settings, device=args.device, dtype=args.dtype, engine=args.engine, insecure=args.insecure
        )
        if _front_keys(settings, args.host) is None:
            return 2
        return run_up(
            settings,
            args.host,
            args.port,
            args.model,
            args.workers,
        )
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
