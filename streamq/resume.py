"""When and how a client re-attaches to a job's event stream: one policy for both clients.

``ResumeState`` follows one ``events()`` call: the last event id seen (sent back as
``Last-Event-ID``), whether the final event came, and how many reconnects in a row found no new
event. The sync and async clients only do the I/O and the sleeping it asks for.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from shared.schemas import StreamEvent
from streamq.errors import StreamqConnectionError, StreamqError
from streamq.protocol import job_path

# Answers worth retrying on a stream: the front (or its Redis) is briefly unavailable.
RETRY_STATUSES = frozenset({429, 502, 503, 504})


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff: ``initial * factor**(n-1)`` seconds before the n-th reconnect in
    a row, at most ``cap``, each stretched by up to ``jitter`` (a fraction). After
    ``max_attempts`` reconnects in a row with no new event, the stream gives up."""

    initial: float = 0.25
    factor: float = 2.0
    cap: float = 4.0
    max_attempts: int = 12
    jitter: float = 0.1

    def delay(self, attempt: int) -> float:
        base = min(self.cap, self.initial * self.factor ** max(0, attempt - 1))
        return base * (1 + self.jitter * random.random())


# Called before each reconnect: (attempt in a row, seconds it will wait, why).
ReconnectHook = Callable[[int, float, str], None]


class ResumeState:
    def __init__(self, job_id: str, last_event_id: str | None, backoff: Backoff) -> None:
        self.job_id = job_id
        self.last_event_id = last_event_id
        self.backoff = backoff
        self.attempts = 0  # reconnects in a row without a new event
        self.reconnects = 0  # all reconnects of this stream
        self.ended = False  # the final event (or a 204) came

    @property
    def path(self) -> str:
        return job_path(self.job_id, "/events")

    def headers(self) -> dict[str, str]:
        head = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
        if self.last_event_id:
            head["Last-Event-ID"] = self.last_event_id
        return head

    def opened(self, status: int) -> bool:
        """Whether an answer with this status carries the stream. A 204 means the final event was
        already received: the stream has ended. Other statuses are for ``failed``."""
        if status == 204:
            self.ended = True
        return status == 200

    def saw(self, event: StreamEvent) -> None:
        """Count an event the caller is about to hand on."""
        if event.id is not None:
            self.last_event_id = event.id
        self.attempts = 0
        if event.final:
            self.ended = True

    def dropped(self, why: str, on_reconnect: ReconnectHook | None = None, at_least: float = 0.0) -> float:
        """The stream ended without its final event (a cut connection, a front going away, a
        stream the front could not continue): the seconds to wait before reconnecting, or
        StreamqConnectionError when the policy says to give up."""
        self.attempts += 1
        if self.attempts > self.backoff.max_attempts:
            raise StreamqConnectionError(
                f"gave up on job {self.job_id}'s events after {self.backoff.max_attempts} reconnects "
                f"with nothing new: {why}",
                job_id=self.job_id,
                last_event_id=self.last_event_id,
            )
        self.reconnects += 1
        wait = max(self.backoff.delay(self.attempts), at_least)
        if on_reconnect is not None:
            on_reconnect(self.attempts, wait, why)
        return wait

    def failed(self, error: StreamqError, on_reconnect: ReconnectHook | None = None) -> float:
        """An error answer to the events request: retried (as a drop) when it is temporary,
        honouring Retry-After; raised otherwise (404 unknown job, 401 bad key, ...)."""
        if error.status not in RETRY_STATUSES:
            raise error
        return self.dropped(str(error), on_reconnect, at_least=error.retry_after or 0.0)
