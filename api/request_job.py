"""A job tied to the HTTP request that waits on it or streams it (the seed's routes, the OpenAI
routes): it is followed from its first event, and canceled when its client goes away, unless
the request asked to keep it running (detached). The job API (``/v1/jobs``) never cancels."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Header
from starlette.requests import Request

from api.auth import Caller
from api.errors import ApiError, job_failure_error
from api.job_client import ClientGone, Events, JobClient, JobEvent, StreamInterrupted
from api.shutdown import STOPPING_FRONT
from shared.job_store.payloads import Failed
from shared.job_store.vocabulary import EventName
from shared.schemas import JobRequest, JobView

log = logging.getLogger("streamq.api")

JOB_HEADER = "X-Streamq-Job-Id"  # lets a client poll, cancel or re-attach to the job
# A stream's response headers: no cache keeps it, and nginx passes each chunk on at once.
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DetachHeader = Annotated[
    str | None, Header(alias="X-Streamq-Detach", description="1: keep the job running if the client goes")
]


def detach_requested(background: bool | None, header: str | None) -> bool:
    """Whether the job runs on when its client goes: ``"background": true`` in the body, or the
    header ``X-Streamq-Detach: 1``."""
    return bool(background) or (header or "").strip().lower() in ("1", "true", "yes")


@dataclass
class WholeAnswer:
    """A job's whole output: its text, its ``done`` event, and the logprob entries its deltas
    carried (the answer's tokens', and the prompt's when asked)."""

    text: str
    done: JobEvent
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    prompt_logprobs: list[dict[str, Any]] | None = None


class RequestJob:
    def __init__(
        self,
        jobs: JobClient,
        view: JobView,
        events: Events,
        detached: bool,
        owner: str,
    ) -> None:
        self.jobs = jobs
        self.owner = owner
        self.view = view
        self.detached = detached
        self._events = events

    @property
    def id(self) -> str:
        return self.view.id

    @classmethod
    async def submit(
        cls, jobs: JobClient, body: JobRequest, request: Request, caller: Caller, *, detached: bool = False
    ) -> RequestJob:
        """Create the job (or raise the ApiError that says why not) and start following it;
        ``request`` is watched for the client's disconnect (ClientGone)."""
        view = await jobs.submit(body, caller)
        return cls(jobs, view, jobs.follow(view, "0-0", request), detached, caller.name)

    async def next_output(self, *, ticks: bool = False) -> JobEvent | None:
        """The next delta or final event; queue positions and ``started`` are skipped, and so are
        keep-alive ticks unless ``ticks`` (then None). An interrupted stream reads as a final
        ``error`` event of type ``stream_interrupted``. Raises ClientGone."""
        try:
            async for event in self._events:
                if event is None:
                    if ticks:
                        return None
                elif event.event == EventName.DELTA or event.final:
                    return event
        except StreamInterrupted as exc:
            interrupted = Failed(type="stream_interrupted", message=str(exc))
            return JobEvent(None, EventName.ERROR, interrupted.encode())
        raise RuntimeError("the job's event stream ended without a final event")

    async def next_event(self) -> JobEvent:
        """The next delta or final event (no ticks)."""
        event = await self.next_output()
        assert event is not None
        return event

    async def whole_answer(self, error_headers: dict[str, str] | None = None) -> tuple[str, JobEvent] | None:
        """Wait for the job's end: its whole text and its ``done`` event, or None when the client
        went away (the job is then canceled unless detached). A job that ends without an answer
        raises its HTTP error (with ``error_headers``)."""
        answer = await self.whole_output(error_headers)
        return None if answer is None else (answer.text, answer.done)

    async def whole_output(self, error_headers: dict[str, str] | None = None) -> WholeAnswer | None:
        """``whole_answer`` with the logprob entries the job's deltas carried."""
        parts: list[str] = []
        entries: list[dict[str, Any]] = []
        prompt_entries: list[dict[str, Any]] | None = None
        async with self.followed():
            while True:
                event = await self.next_event()
                if event.event == EventName.DELTA:
                    parts.append(event.data.get("text", ""))
                    entries += event.data.get("logprobs") or []
                    if prompt_entries is None:  # the first (a continued job does not send them again)
                        prompt_entries = event.data.get("prompt_logprobs")
                elif event.event == EventName.DONE:
                    return WholeAnswer("".join(parts), event, entries, prompt_entries)
                else:
                    error = self.failure(event)
                    if error_headers:
                        error.headers = {**(error.headers or {}), **error_headers}
                    raise error
        return None  # the client went away

    @contextlib.asynccontextmanager
    async def followed(self) -> AsyncIterator[None]:
        """Around a route's reading of the job to its end: the client going away (ClientGone, or
        the request torn down) cancels the job unless detached, and the job's events are closed
        after. ClientGone ends the block quietly; anything else goes on up."""
        try:
            yield
        except ClientGone:
            self.client_gone()
        except asyncio.CancelledError:
            self.client_gone()
            raise
        finally:
            await self.close()

    def failure(self, event: JobEvent) -> ApiError:
        """The HTTP error of the job's final event when it ended without its answer; a wait the
        front could not follow to its end also cancels the job (``interrupted_wait``)."""
        error = job_failure_error(event.event, event.data)
        if error.type == "stream_interrupted":
            return self.interrupted_error(error.message)
        return error

    def interrupted_error(
        self, reason: str, resource: str = "", headers: dict[str, str] | None = None
    ) -> ApiError:
        """The 503 of a wait the front could not follow to its end (``interrupted_wait``): its
        job canceled, ``front_stopping`` (send the request again, to another front) with a
        Retry-After; a detached job runs on (``stream_interrupted``: read it where it says)."""
        message = self.interrupted_wait(reason, resource)
        if self.detached:
            return ApiError(
                503, message, type="stream_interrupted", code="stream_interrupted", headers=headers
            )
        code = "front_stopping" if reason.startswith(STOPPING_FRONT) else "stream_interrupted"
        headers = {**(headers or {}), "Retry-After": "1"}
        return ApiError(503, message, type="stream_interrupted", code=code, headers=headers)

    def interrupted_wait(self, reason: str, resource: str = "") -> str:
        """A request waiting for the whole answer could not follow its job to the end (the front
        is stopping, its stream read failed: ``reason``): the client can only send the request
        again (the SDKs do so after the 503 at once), so the job is canceled unless detached, not
        left to run beside its retry. The error's message (``resource``: where a detached job's
        result is read, its job by default)."""
        self.client_gone()
        if reason.startswith(STOPPING_FRONT):  # the streams' hint: there is no stream to resume
            reason = STOPPING_FRONT
        if self.detached:
            return f"{reason}; the job runs on: GET {resource or f'/v1/jobs/{self.id}'}"
        return f"{reason}; its job is being canceled: send the request again"

    def client_gone(self) -> None:
        """The client went away (or its request was torn down): cancel the job without waiting,
        unless it is detached."""
        if self.detached:
            log.info("job %s: its client went away; it runs on (detached)", self.id)
            return
        jobs, job_id, owner = self.jobs, self.id, self.owner

        async def cancel() -> None:
            with contextlib.suppress(Exception):
                await jobs.cancel(job_id, owner)

        jobs.spawn(cancel())

    async def close(self) -> None:
        await self._events.aclose()
