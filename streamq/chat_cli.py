"""``streamq chat`` (an interactive terminal chat) and ``streamq ask`` (one answer, for scripts).

Both stream the answer as it is generated, show the queue position while the job waits, and ride
out a dropped connection (the client resumes with Last-Event-ID: no text lost or repeated).
Ctrl-C during an answer cancels its job on the server; in the chat it then returns to the prompt.

History: the chat sends the whole conversation with each question. An answer that finished is
kept in it (also one cut by the token limit); a stopped (canceled) or failed answer is left out
together with its question, so the next question goes on from the last complete exchange. A
conversation that outgrew the model's context loses its oldest exchanges, as many as it takes
(the chat says so), not the question.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from streamq.render import Renderer
    from streamq.sync_client import StreamqClient
    from streamq.turn import Turn

HELP = "commands: /reset clears the conversation · /exit quits · Ctrl-C stops an answer"


def add_commands(sub: Any) -> None:
    """Add ``chat`` and ``ask`` to the ``streamq`` command's subparsers."""
    chat = sub.add_parser("chat", help="chat with a served model in the terminal")
    ask = sub.add_parser("ask", help="print one streamed answer (plain text when not a terminal)")
    ask.add_argument("question", nargs="+", help="the question ('-' reads it from stdin)")
    for p in (chat, ask):
        p.add_argument(
            "--url", default=None, help="the front (default: STREAMQ_URL or http://127.0.0.1:8000)"
        )
        p.add_argument("--model", help="served model name (default: the one served)")
        p.add_argument("--system", help="a system message that starts the conversation")
        p.add_argument("--api-key", help="API key, sent as a Bearer token (default: STREAMQ_API_KEY)")
        p.add_argument("--max-tokens", type=int, help="most tokens per answer (default: the server's)")
        p.add_argument("--temperature", type=float, help="0 = greedy (default: the server's)")
        p.add_argument(
            "--reconnects",
            type=int,
            default=12,
            help="reconnects in a row without news before giving up on an answer (default 12, ~40 s)",
        )


def run(args: argparse.Namespace) -> int:
    from streamq.protocol import default_url
    from streamq.resume import Backoff
    from streamq.sync_client import StreamqClient

    backoff = Backoff(max_attempts=max(1, args.reconnects))
    try:
        client = StreamqClient(args.url or default_url(), api_key=args.api_key, backoff=backoff)
    except ValueError as exc:  # a URL it cannot send to (no http://)
        print(exc, file=sys.stderr)
        return 2
    with client:
        if args.command == "ask":
            return _ask(client, args)
        return _chat(client, args)


def _options(args: argparse.Namespace) -> dict[str, Any]:
    given = {"model": args.model, "max_tokens": args.max_tokens, "temperature": args.temperature}
    return {k: v for k, v in given.items() if v is not None}


def _renderer(summary: bool) -> Renderer:
    from rich.console import Console

    from streamq.render import LiveRenderer, PlainRenderer

    if sys.stdout.isatty():
        return LiveRenderer(Console(highlight=False))
    return PlainRenderer(sys.stdout, summary=summary)


def answer(
    client: StreamqClient, messages: list[dict[str, str]], options: dict[str, Any], renderer: Renderer
) -> Turn | None:
    """Submit one question and draw its answer until the job ends; Ctrl-C cancels it. The Turn,
    or None when the job could not be submitted (a Ctrl-C while submitting propagates)."""
    from streamq.errors import StreamqError

    try:
        view = client.submit(messages, **options)
    except StreamqError as exc:
        _not_submitted(exc, renderer)
        return None
    return follow(client, view, renderer)


def _not_submitted(exc: Exception, renderer: Renderer) -> None:
    hint = " (give the key with --api-key or STREAMQ_API_KEY)" if getattr(exc, "status", None) == 401 else ""
    renderer.problem(f"could not submit the question: {exc}{hint}")


def follow(client: StreamqClient, view: Any, renderer: Renderer) -> Turn:
    """Draw a submitted job's answer until it ends; Ctrl-C cancels it."""
    from streamq.errors import StreamqError
    from streamq.turn import Turn

    turn = Turn(view.id, position=view.position)
    note = None
    try:  # from here on the job exists: a Ctrl-C anywhere below cancels it
        with renderer:
            try:
                renderer.update(turn)
                for event in client.events(turn.job_id, on_reconnect=turn.on_reconnect):
                    turn.apply(event)
                    renderer.update(turn)
            except KeyboardInterrupt:
                note = _stop(client, turn, renderer)
            except StreamqError as exc:
                note = (
                    f"lost the answer's stream ({exc}); job {turn.job_id} may still be running: "
                    f"see GET /v1/jobs/{turn.job_id}"
                )
            renderer.finish(turn, note)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping: the cancel still goes out
        if not turn.ended:
            _cancel(client, turn.job_id)
    return turn


def _cancel(client: StreamqClient, job_id: str) -> str | None:
    """Ask for the cancel, whatever Ctrl-C comes meanwhile (it is sent again); a note when it
    could not be sent."""
    from streamq.errors import StreamqError

    while True:
        try:
            client.cancel(job_id)
            return None
        except KeyboardInterrupt:
            continue
        except StreamqError as exc:
            return None if exc.status == 409 else f"could not cancel job {job_id}: {exc}"


def _stop(client: StreamqClient, turn: Turn, renderer: Renderer) -> str | None:
    """Cancel the job, then take the text it made before the cancel landed, up to its end."""
    from streamq.errors import StreamqError

    turn.stopping = True
    renderer.update(turn)
    problem = _cancel(client, turn.job_id)  # 409: it had ended already; its last events say how
    if problem is not None:
        return problem
    try:
        for event in client.events(turn.job_id, last_event_id=turn.last_event_id):
            turn.apply(event)
            renderer.update(turn)
    except (KeyboardInterrupt, StreamqError):
        pass
    return None


def _read_question(args: argparse.Namespace) -> str:
    if args.question == ["-"]:
        return sys.stdin.read().strip()
    return " ".join(args.question)


def _ask(client: StreamqClient, args: argparse.Namespace) -> int:
    """0: the answer finished; 130: stopped with Ctrl-C; 1: no answer, a failed one, or one whose
    stream was lost before its end (what was printed is not the whole answer)."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    messages.append({"role": "user", "content": _read_question(args)})
    try:
        turn = answer(client, messages, _options(args), _renderer(summary=False))
    except KeyboardInterrupt:  # while submitting
        print("streamq: interrupted", file=sys.stderr)
        return 130
    if turn is None or turn.phase == "error" or not turn.ended:
        return 1
    return 130 if turn.phase == "canceled" else 0


TOO_LONG = "context_length_exceeded"


def _ask_fitting(
    client: StreamqClient, messages: list[dict[str, str]], kept: int, options: dict[str, Any]
) -> tuple[Turn, list[dict[str, str]]]:
    """Ask, and draw the answer. While the conversation is longer than the model's context (the
    front's 400 at submit, or the worker's refusal when the front could not count it), leave out
    its oldest exchange (a question and its answer; the first ``kept`` messages, the system
    message, stay) and ask again, saying so. The turn, and the messages it was asked with; the
    server's error when even the question alone does not fit."""
    from streamq.errors import StreamqError

    dropped = 0
    while True:
        trimmable = len(messages) - kept >= 3
        try:
            view = client.submit(messages, **options)
        except StreamqError as exc:
            if exc.code != TOO_LONG or not trimmable:
                raise
        else:
            if dropped:
                _left_out(dropped)
                dropped = 0
            turn = follow(client, view, _renderer(summary=True))
            refused = turn.error.code if turn.phase == "error" and turn.error is not None else None
            if refused != TOO_LONG or not trimmable:
                return turn, messages
        messages = [*messages[:kept], *messages[kept + 2 :]]
        dropped += 1


def _left_out(dropped: int) -> None:
    print(
        f"(the conversation outgrew the model's context: its {dropped} oldest exchange"
        f"{'s were' if dropped > 1 else ' was'} left out)",
        flush=True,
    )


def _chat(client: StreamqClient, args: argparse.Namespace) -> int:
    from streamq.errors import StreamqError

    editing = False
    with contextlib.suppress(ImportError):  # not on every platform
        import readline  # noqa: F401 - line editing and history for input()

        editing = True
    tty = sys.stdout.isatty()
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    where = f"{client.url}" + (f" · model {args.model}" if args.model else "")
    print(f"streamq chat · {where}\n{HELP}", flush=True)
    # Line editing is told which of the prompt's characters take no columns (\001 … \002), or it
    # counts the colour codes and redraws an edited line in the wrong places.
    hide, show = ("\001", "\002") if editing else ("", "")
    colour = tty and os.environ.get("TERM") != "dumb"
    prompt = f"{hide}\x1b[1;32m{show}you ›{hide}\x1b[0m{show} " if colour else "you › "
    while True:
        try:
            line = input(prompt).strip()
        except (EOFError, KeyboardInterrupt):
            print(flush=True)
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = list(start)
            print("(conversation cleared)", flush=True)
            continue
        if line.startswith("/"):
            print(HELP, flush=True)
            continue
        messages = [*history, {"role": "user", "content": line}]
        try:
            turn, messages = _ask_fitting(client, messages, len(start), _options(args))
        except KeyboardInterrupt:  # while submitting: no job id came back to cancel
            print("(interrupted while sending; the question may still be answered on the server)")
            continue
        except StreamqError as exc:
            _not_submitted(exc, _renderer(summary=True))
            continue
        history = messages[:-1]  # without the exchanges left out, if any were
        if turn is not None and turn.phase == "done":
            history = [*messages, {"role": "assistant", "content": turn.text}]
        elif turn is not None:
            print("(not kept in the conversation)", flush=True)
