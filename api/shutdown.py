"""A stopping front ends its open streams itself, before uvicorn's grace runs out.

On SIGTERM (or Ctrl-C) uvicorn stops taking connections and waits ``STREAMQ_SHUTDOWN_GRACE``
for the open requests; then it cancels them. A canceled request looked like a client that went
away: the OpenAI and seed routes canceled its job, a request waiting for a whole answer got
uvicorn's bare 500, and each left a traceback in the log. Instead, a second before the grace
ends (at once with no grace), every stream this front follows is ended as a Redis outage ends
it: a job API stream with its "reconnect with Last-Event-ID" comment, an OpenAI or Responses
stream with an error event, a request waiting for its answer (and the seed's ``/stream``) with a
503 in the error envelope. The streams' jobs run on, for their clients to resume on another front;
a whole-answer request's job is canceled unless detached (``RequestJob.interrupted_wait``): its
client can only send the request again.

The handler is chained in front of uvicorn's own (it keeps doing what it does) and taken off
when the app stops.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType
from typing import Any

from api.job_client import JobClient

log = logging.getLogger("streamq.api")

STOPPING_FRONT = "this front is stopping"
# What a stream's client is told (a request that waits for the whole answer is told its own way:
# RequestJob.failure).
STOPPING = f"{STOPPING_FRONT}: resume the stream, or send the request again, on another front"
BEFORE_THE_CUT = 1.0  # seconds before uvicorn's grace ends that the streams are ended
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def end_streams_when_stopping(jobs: JobClient, grace: float) -> Callable[[], None]:
    """Chain a handler of SIGTERM and SIGINT in front of the server's (uvicorn's): the first
    signal ends ``jobs``' streams ``grace - BEFORE_THE_CUT`` seconds later. Returns what takes it
    off again. Nothing is chained where the server has no handler of its own (not uvicorn's
    ``streamq api``): its signals are left as they are."""
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {sig: signal.getsignal(sig) for sig in SIGNALS}
    scheduled = False

    def end_streams() -> None:
        log.info("the front is stopping: its open streams end (their jobs run on)")
        jobs.end_streams(STOPPING)

    def schedule() -> None:
        nonlocal scheduled
        if scheduled:  # a second signal: uvicorn quits at once ("force quit"), so end them now
            loop.call_soon(end_streams)
            return
        scheduled = True
        loop.call_later(max(0.0, grace - BEFORE_THE_CUT), end_streams)

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(schedule)
        previous[signum](signum, frame)

    chained = [sig for sig, prior in previous.items() if callable(prior)]
    for sig in chained:
        signal.signal(sig, handler)

    def unchain() -> None:
        for sig in chained:
            if signal.getsignal(sig) is handler:
                signal.signal(sig, previous[sig])

    return unchain
