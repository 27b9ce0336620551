"""``streamq worker`` (serve one model from the queue) and ``streamq make-tiny-model``.

torch and the engines are imported only when a command runs, not to build the parser.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import redis
from pydantic import ValidationError

from shared.cli_options import DEVICES, DTYPES, ENGINE_HELP, ENGINES, with_options
from shared.redis_connect import RedisTarget, redis_problem
from shared.settings_loading import load_settings, refuse_to_start


def add_commands(sub: Any) -> None:
    """Add ``worker`` and ``make-tiny-model`` to the ``streamq`` command's subparsers."""
    worker = sub.add_parser("worker", help="run a worker that serves one model")
    worker.add_argument("--model", help="hub name or local folder (default: STREAMQ_MODEL)")
    worker.add_argument("--served-name", help="the model name clients use (default: folder or hub name)")
    worker.add_argument("--device", choices=DEVICES)
    worker.add_argument("--dtype", choices=DTYPES)
    worker.add_argument("--engine", choices=ENGINES, help=ENGINE_HELP)
    worker.add_argument("--trust-remote-code", action="store_true", default=None, help="needed for ChatGLM")
    worker.add_argument("--name", help="worker name (default: host.pid)")
    worker.add_argument("--burst", action="store_true", help="quit when the queue is empty")
    worker.add_argument("--slots", type=int, help="jobs run at once (default: 8 on CPU, what fits on a GPU)")
    worker.add_argument(
        "--backend", choices=["model", "synthetic"], help="synthetic: no model, paced tokens (load tests)"
    )
    worker.add_argument(
        "--tokens-per-second",
        type=float,
        help="pace of the synthetic backend (STREAMQ_SYNTHETIC_TOKENS_PER_SECOND; default 20)",
    )

    tiny = sub.add_parser("make-tiny-model", help="build a small random-weight chat model into DIR")
    tiny.add_argument("dir")
    tiny.add_argument("--shape", default="tiny", help="tiny (default), tiny-hd64 (for vLLM) or qwen2.5-0.5b")


def run(args: argparse.Namespace) -> int:
    if args.command == "make-tiny-model":
        from worker.tiny_model import make_tiny_model

        try:
            path = make_tiny_model(args.dir, shape=args.shape)
        except (OSError, ValueError) as exc:  # an unknown shape, a folder that is there already
            print(f"streamq make-tiny-model: {exc}", file=sys.stderr)
            return 2
        print(f"tiny model written to {path}")
        return 0
    from worker.main import run_worker

    try:
        settings = with_options(
            load_settings(),
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
    except ValidationError as exc:
        return refuse_to_start(exc)
    if settings.backend == "model" and not settings.model:
        print("streamq worker: give --model NAME_OR_PATH (or set STREAMQ_MODEL)", file=sys.stderr)
        return 2
    model = settings.model or ""
    if settings.backend == "model" and looks_local(model) and not Path(model).expanduser().is_dir():
        print(f"streamq worker: cannot serve {model}: there is no such folder", file=sys.stderr)
        return 1
    try:
        return run_worker(settings, name=args.name, burst=args.burst)
    except redis.RedisError as exc:  # checked before the model loads
        target = RedisTarget.of(settings).describe()
        print(f"streamq worker: cannot reach Redis at {target}: {redis_problem(exc)}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:  # a model that cannot be found or loaded
        print(f"streamq worker: cannot serve {settings.model}: {exc}", file=sys.stderr)
        return 1


def looks_local(model: str) -> bool:
    """A model given as a path (absolute, relative with ./ or ../, or from ~), not a hub name."""
    return model.startswith(("/", "./", "../", "~"))
