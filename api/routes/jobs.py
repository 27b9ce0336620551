"""The job API: submit, poll, stream (SSE), cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Request, Response
from fastapi.responses import StreamingResponse

from api import idempotency
from api.auth import CallerDep
from api.body_checks import CheckedBodyRoute
from api.errors import ApiError, error_responses
from api.idempotency import IdempotencyKeyHeader, Idempotent
from api.job_client import ClientGone, JobEvent, JobsDep, StreamInterrupted
from api.request_job import STREAM_HEADERS
from api.stream_hub import parse_entry_id
from shared.job_store.vocabulary import FINAL_STATUSES
from shared.schemas import JobRequest, JobView

router = APIRouter(
    route_class=CheckedBodyRoute,
    prefix="/v1/jobs",
    tags=["jobs"],
    responses=error_responses(401, 503),
)


# Only events end with a blank line, and every event has data. ``retry:`` opens the stream
# (EventSource: reconnect after 1 s when the stream ends early) with no blank line after it, so
# it is a field of the first event; keep-alives are comment lines, also without a blank line, so
# they are lines of the next event's block. A block without data (a comment, or a lone
# ``retry:``, then a blank line) is no event to EventSource, but httpx-sse 0.4 (and the openai
# SDK's reader) hand one on as an empty ``message`` once an ``id:`` was seen, and a ``retry:``
# block at any time (florimondmanca/httpx-sse#35): ``json.loads`` of its data fails.
RETRY = b"retry: 1000\n"
PING = b": ping\n"
INTERRUPTED = b": interrupted, reconnect with Last-Event-ID\n"


def sse_message(event: JobEvent | None) -> bytes:
    """Server-Sent Events framing; None is the keep-alive comment line."""
    if event is None:
        return PING
    head = f"id: {event.id}\n" if event.id else ""
    return f"{head}event: {event.event}\ndata: {event.raw}\n\n".encode()


@router.post("", status_code=202, responses=error_responses(400, 404, 413, 415, 429))
async def create_job(
    body: JobRequest,
    response: Response,
    jobs: JobsDep,
    caller: CallerDep,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobView:
    """Queue a chat job. Answers 202 with the job's view; follow it at ``/v1/jobs/{id}/events``.
    With an ``Idempotency-Key``, the request sent again gets the job the first one made, as it
    is now (``Idempotent-Replayed: true``); the key with another request is a 400."""
    view = await jobs.submit(body, caller, Idempotent.of(idempotency_key, body))
    response.headers["Location"] = f"/v1/jobs/{view.id}"
    if view.replayed:
        response.headers.update(idempotency.REPLAYED)
    return view


@router.get("/{job_id}", responses=error_responses(404))
async def get_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> JobView:
    """The job's status, queue position, answer so far, usage and timings."""
    return await jobs.view(job_id, caller.name)


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses=error_responses(400, 404)
    | {
        200: {"content": {"text/event-stream": {}}},
        204: {"description": "the job has ended and Last-Event-ID was its final event"},
    },
)
async def job_events(
    job_id: str,
    request: Request,
    jobs: JobsDep,
    caller: CallerDep,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Server-Sent Events: ``queued`` (position), ``started``, ``delta`` ({text}), then one of
    ``done`` / ``error`` / ``canceled``. Send ``Last-Event-ID`` to get only the events after it;
    204 when that was the job's final event."""
    view = await jobs.view(job_id, caller.name, brief=True)  # the events carry its text and place
    last_event_id = (last_event_id or "").strip() or None  # empty: none, as EventSource means it
    if last_event_id is not None:
        try:
            after = parse_entry_id(last_event_id)
        except ValueError:
            raise ApiError(
                400, "Last-Event-ID must be an event id such as 1700000000000-0", param="Last-Event-ID"
            ) from None
        newest, known = await jobs.resume_point(job_id, after)
        if newest is not None and after == parse_entry_id(newest) and view.status in FINAL_STATUSES:
            return Response(status_code=204)  # it has every event; EventSource stops here
        if not known and after != (0, 0):  # 0-0: from the start. Else another job's, made up, or
            # one Redis lost (a crash of its machine: the job goes on from what it kept)
            raise ApiError(400, "Last-Event-ID is not an event of this job", param="Last-Event-ID")
    events = jobs.follow(view, last_event_id or "0-0", request)

    async def body() -> AsyncIterator[bytes]:
        yield RETRY  # a field of the first event
        try:
            async for event in events:
                yield sse_message(event)
        except ClientGone:
            return  # the job runs on (detached); the client may re-attach with Last-Event-ID
        except StreamInterrupted:
            # A resumable end: EventSource reconnects with Last-Event-ID by itself.
            yield INTERRUPTED
        finally:
            await events.aclose()

    # The keep-alive's interval: a client that heard nothing for a few of them takes the stream
    # for lost (a front that froze, a network path that dropped it silently) and resumes.
    heard_every = {"X-Streamq-Ping-Interval": f"{jobs.settings.ping_interval:g}"}
    return StreamingResponse(body(), media_type="text/event-stream", headers=STREAM_HEADERS | heard_every)


@router.post("/{job_id}/cancel", responses=error_responses(404, 409))
async def cancel_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> JobView:
    """Cancel a queued or running job; 409 (with the job) if it had already ended."""
    return await jobs.cancel(job_id, caller.name)


@router.delete("/{job_id}", responses=error_responses(404, 409))
async def delete_job(job_id: str, jobs: JobsDep, caller: CallerDep) -> JobView:
    """Same as ``POST /v1/jobs/{id}/cancel``."""
    return await jobs.cancel(job_id, caller.name)
