"""The ``streamq`` command: ``up``, ``status``, ``api``, ``worker``, ``make-tiny-model``, ``chat``, ``ask``.

Only wiring: each component adds its own subcommands and runs them (api/cli.py, worker/cli.py,
streamq/stack_cli.py, streamq/chat_cli.py). Those modules import their heavy parts when a command
runs, so ``streamq api`` never loads torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from api import cli as api_cli
from streamq import chat_cli, stack_cli
from worker import cli as worker_cli

DESCRIPTION = """\
Serve chat models behind an OpenAI-compatible HTTP API, with a durable job queue in Redis:
answers stream, survive a worker's crash, and can be re-read from any front.

  streamq up                      Redis, a front and a worker on this machine (the demo model)
  streamq up --model DIR          the same, serving a model folder (or a hub name)
  streamq chat                    chat with it in the terminal
  streamq api / streamq worker    run the parts on their own (several hosts; see the README)

Settings are STREAMQ_* environment variables (the README's Configuration section); each
command's --help lists its options."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamq", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    stack_cli.add_commands(sub)  # up, status
    api_cli.add_commands(sub)  # api
    worker_cli.add_commands(sub)  # worker, make-tiny-model
    chat_cli.add_commands(sub)  # chat, ask: the terminal clients
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("up", "status"):
        # `up` first asks the front's own check whether a front would start with these settings.
        return stack_cli.run(args, front_may_start=api_cli.front_may_start)
    if args.command == "api":
        return api_cli.run(args)
    if args.command in ("worker", "make-tiny-model"):
        return worker_cli.run(args)
    if args.command in ("chat", "ask"):
        return chat_cli.run(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
