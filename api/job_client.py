"""The one boundary between the front's routes and the job system.

Routes see a ``JobClient`` (as vLLM's OpenAI server sees an ``EngineClient``): submit a job,
view it, cancel it, follow its events from a position, and ask which models are served. The
production client (``api.redis_job_client.RedisJobClient``) keeps jobs in Redis and RQ; the fast
tests drive the same routes through an in-memory one. Everything above this line (validation
of the HTTP request, auth, the error envelope, OpenAI and seed formatting, SSE framing,
Last-Event-ID handling) is the same for both.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, Coroutine
from typing import Annotated, Any, Protocol

from fastapi import Depends, Request

from api.auth import Caller
from api.idempotency import Idempotent
from shared.job_store.payloads import encode
from shared.job_store.vocabulary import FINAL_EVENTS
from shared.schemas import JobRequest, JobView
from shared.settings import Settings


class JobEvent:
    """One event of a job. ``id`` is its stream entry id (None for a live position update).

    It keeps the JSON text of its data as stored, so relaying a delta to an SSE client costs no
    parse and no dump; ``data`` parses it on first use (the waiting routes read the text)."""

    __slots__ = ("_data", "event", "id", "raw")

    def __init__(self, id: str | None, event: str, raw: str) -> None:
        self.id = id
        self.event = event
        self.raw = raw
        self._data: dict[str, Any] | None = None

    @classmethod
    def of(cls, id: str | None, event: str, data: dict[str, Any]) -> JobEvent:
        return cls(id, event, encode(data))

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = json.loads(self.raw or "{}")
        return self._data

    @property
    def final(self) -> bool:
        return self.event in FINAL_EVENTS


class ClientGone(Exception):
    """The HTTP client went away while its job was being followed."""


class StreamInterrupted(Exception):
    """A job's events could not be read (the job store failed); the client may resume later from
    the last event id it got."""


# What ``follow`` yields: an event, or None as a keep-alive tick.
Events = AsyncGenerator[JobEvent | None, None]


class JobClient(Protocol):
    settings: Settings

    async def submit(
        self, request: JobRequest, caller: Caller, idempotent: Idempotent | None = None
    ) -> JobView:
        """Check the caller's quotas, validate the request, admit and queue the job; raises the
        ApiError that says why not. With an Idempotency-Key (``api.idempotency``), the job that
        key made already, if any, as it is now (its view ``replayed``)."""
        ...

    async def view(self, job_id: str, owner: str, *, brief: bool = False) -> JobView:
        """``owner``'s job (404 ApiError if there is none: another key's job is not found);
        ``brief``: its text and queue position may be left out (for a caller that follows its
        events, which carry both)."""
        ...

    async def cancel(self, job_id: str, owner: str) -> JobView:
        """Cancel ``owner``'s job; 409 ApiError (with the job) if it had already ended."""
        ...

    def follow(self, job: JobView, after: str, request: Request | None) -> Events:
        """The job's events after the event id ``after`` ("0-0": all) until its final one, with
        live ``queued`` positions (no id) while it waits and None as a keep-alive tick
        (``ping_interval`` after the last tick or output, positions or not). Raises
        ClientGone when ``request``'s client disconnects, StreamInterrupted when the events
        cannot be read."""
        ...

    def end_streams(self, reason: str) -> None:
        """End every ``follow`` now, and any begun from now on, with StreamInterrupted(``reason``):
        the front is stopping. Jobs run on; their clients resume or retry on another front."""
        ...

    async def resume_point(self, job_id: str, event_id: tuple[int, int]) -> tuple[str | None, bool]:
        """The id of the job's newest event (None: it has none), and whether ``event_id`` (a
        resuming client's Last-Event-ID) is one of its events."""
        ...

    async def save_response(self, job_id: str, owner: str, record: str) -> None:
        """Keep a Responses API response's record (JSON text) beside ``owner``'s job ``job_id``,
        for as long as the job may live."""
        ...

    async def load_response(self, job_id: str, owner: str) -> str | None:
        """The record kept beside ``owner``'s job, or None: none kept, another key's, deleted, or
        its job is gone."""
        ...

    async def delete_response(self, job_id: str, owner: str) -> bool:
        """Forget ``owner``'s record (the job itself is untouched); False if there was none."""
        ...

    async def served_models(self) -> dict[str, float]:
        """The models live workers serve, each with when the first of them started."""
        ...

    async def readiness(self) -> dict[str, Any]:
        """``{"ready", "redis", "models"}`` for /readyz (and ``error`` when the store is down)."""
        ...

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` in the background, kept until it ends (a cancel for a client that left)."""
        ...

    async def close(self) -> None: ...


async def get_jobs(request: Request) -> JobClient:
    """The app's job client (a FastAPI dependency)."""
    jobs: JobClient = request.app.state.jobs
    return jobs


JobsDep = Annotated[JobClient, Depends(get_jobs)]
