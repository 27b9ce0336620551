"""OpenAI's Responses API on the job queue: ``POST /v1/responses``, ``GET /v1/responses/{id}``
(``stream=true``, ``starting_after``), ``POST /v1/responses/{id}/cancel``,
``DELETE /v1/responses/{id}`` and ``GET /v1/responses/{id}/input_items``.

A response is a streamq job (``resp_<job id>``; the job id is also in ``X-Streamq-Job-Id``), so
it is polled, streamed, re-attached and canceled from any front, and survives a worker's crash as
its job does. Its events are numbered from the job's stream alone (``api.responses_format``):
a stream re-attached with ``starting_after=N`` on any front goes on exactly after event N.

When the client of a request goes away: a ``background`` response runs on (read it later with
``GET``); a foreground one (streamed or not) is canceled, as on the chat route, unless the
request sent ``X-Streamq-Detach: 1``. A ``GET`` stream that goes away cancels nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from api import idempotency
from api.auth import CallerDep
from api.body_checks import CheckedBodyRoute
from api.errors import ApiError, error_responses
from api.idempotency import REPLAYED, IdempotencyKeyHeader, Idempotent
from api.job_client import ClientGone, Events, JobClient, JobsDep, StreamInterrupted
from api.request_job import JOB_HEADER, STREAM_HEADERS, DetachHeader, RequestJob, detach_requested
from api.responses_format import PING, ResponseEvents, item_list, response_of, sse_event
from api.responses_schemas import ResponsesRequest, named_as_sent
from api.responses_store import (
    ResponseRecord,
    earlier_turns,
    load_record,
    made_for,
    new_record,
    response_status,
    save_record,
)
from shared.job_store.vocabulary import FINAL_STATUSES, JobStatus
from shared.schemas import ChatMessage

log = logging.getLogger("streamq.api")
RECORD_TRIES = 20  # a replayed response's record: looked for over a second at most
router = APIRouter(
    prefix="/v1/responses",
    tags=["responses"],
    responses=error_responses(401, 503),
    route_class=CheckedBodyRoute,
)
_JSON_OR_SSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {}, "text/event-stream": {}}}
}
NoInclude = Annotated[list[str] | None, Query(description="nothing more can be included: only empty")]


@router.post("", response_model=None, responses=_JSON_OR_SSE | error_responses(400, 404, 413, 415, 429))
async def create_response(
    body: ResponsesRequest,
    request: Request,
    jobs: JobsDep,
    caller: CallerDep,
    detach: DetachHeader = None,
    idempotency_key: IdempotencyKeyHeader = None,
) -> Response:
    """Create a response (a job): the response object, or with ``stream`` its events. With
    ``background`` it answers at once (status queued) and runs on whatever the client does; an
    ``Idempotency-Key`` then makes a request sent again get the response the first one made."""
    idempotent = Idempotent.of(idempotency_key, body)  # the body as sent: metadata, user too
    if not body.background:
        idempotency.refuse(idempotency_key, "a response without background")
    history: list[ChatMessage] = []
    chain: list[str] = []
    if body.previous_response_id:
        history, chain = await earlier_turns(jobs, body.previous_response_id, caller.name)
        body.leave_out(made_for(chain))
    job_request = body.job_request(history)
    try:
        view = await jobs.submit(job_request, caller, idempotent)
    except ApiError as exc:  # name the field as the client sent it
        raise named_as_sent(exc, body.tool_plan().forces_call) from None
    if view.replayed:  # the response the first request made, as it is (404 if deleted since)
        record = await _record_made(jobs, view.id, caller.name)
    else:
        try:
            record = new_record(body, view, history, chain, detach_requested(body.background, detach))
            await save_record(jobs, record, caller.name)
        except BaseException:  # a response without its record is none: its job goes
            jobs.spawn(_cancel_quietly(jobs, view.id, caller.name))
            raise
    if body.user or body.safety_identifier or body.metadata:
        user = (body.user or body.safety_identifier or "")[:64]
        log.info("job %s: response for user %r, metadata %s", view.id, user, body.metadata)
    headers = {JOB_HEADER: view.id} | (REPLAYED if view.replayed else {})
    if body.background and not body.stream:
        return JSONResponse(response_of(record, view), headers=headers)
    events = jobs.follow(view, "0-0", request)
    job = RequestJob(jobs, view, events, detach_requested(body.background, detach), caller.name)
    if body.stream:
        stream = _followed(job, events, record)
        return StreamingResponse(stream, media_type="text/event-stream", headers=STREAM_HEADERS | headers)
    return await _wait(job, events, record, headers)


async def _record_made(jobs: JobClient, job_id: str, owner: str) -> ResponseRecord:
    """The record of a response made already: its first request saves it just after its job, so
    a request sent again at once may look for it a moment before it is there."""
    for _ in range(RECORD_TRIES - 1):
        if await jobs.load_response(job_id, owner) is not None:
            break
        await asyncio.sleep(0.05)
    return await load_record(jobs, f"resp_{job_id}", owner)


async def _cancel_quietly(jobs: JobClient, job_id: str, owner: str) -> None:
    with contextlib.suppress(Exception):
        await jobs.cancel(job_id, owner)


async def _wait(job: RequestJob, events: Events, record: ResponseRecord, headers: dict[str, str]) -> Response:
    """The finished response object, whatever its end (completed, incomplete, failed,
    cancelled), except a job refused for what the request asked (a JSON schema its worker cannot
    compile): that is a 400 naming the field, as when the front refuses it. 499 when the client
    went away first."""
    mapped = ResponseEvents(record)
    try:
        async with job.followed():
            async for event in events:
                if event is not None:
                    mapped.feed(event)
                if mapped.final:
                    if mapped.failure is not None and mapped.failure.status == 400:
                        mapped.failure.headers = {**(mapped.failure.headers or {}), **headers}
                        raise mapped.failure
                    return JSONResponse(mapped.response(), headers=headers)
    except StreamInterrupted as exc:
        resource = f"/v1/responses/{record.response_id}"
        raise job.interrupted_error(str(exc), resource, headers) from None
    return Response(status_code=499)


async def _events(record: ResponseRecord, events: Events, after: int | None) -> AsyncGenerator[bytes, None]:
    """The response's events from the job's, those numbered after ``after``; keep-alive comments
    while nothing comes. A stream the front cannot read on ends with an ``error`` data (which the
    SDK raises) saying where to resume. Raises ClientGone."""
    mapped = ResponseEvents(record)
    sent = -1 if after is None else after
    try:
        async for event in events:
            if event is None:
                yield PING
                continue
            for out in mapped.feed(event):
                if out["sequence_number"] > sent:
                    sent = out["sequence_number"]
                    yield sse_event(out)
            if mapped.final:
                return
    except StreamInterrupted as exc:
        resume = f"GET /v1/responses/{record.response_id}?stream=true"
        if sent >= 0:
            resume += f"&starting_after={sent}"
        message = f"{exc}; the response may still run: resume with {resume}"
        error = ApiError(503, message, type="stream_interrupted", code="stream_interrupted")
        yield sse_event(error.envelope(), "error")


async def _followed(job: RequestJob, events: Events, record: ResponseRecord) -> AsyncIterator[bytes]:
    """A created response's stream: the client going away cancels its job unless detached."""
    async with job.followed(), contextlib.aclosing(_events(record, events, None)) as stream:
        async for chunk in stream:
            yield chunk


async def _reattached(events: Events, record: ResponseRecord, after: int | None) -> AsyncIterator[bytes]:
    """A re-attached stream: the client going away cancels nothing."""
    try:
        async with contextlib.aclosing(_events(record, events, after)) as stream:
            async for chunk in stream:
                yield chunk
    except ClientGone:
        return
    finally:
        await events.aclose()


def _refuse_include(request: Request) -> None:
    given = request.query_params.getlist("include") + request.query_params.getlist("include[]")
    if given:
        raise ApiError(400, f"cannot include {given}: no such output is offered here", param="include")


@router.get("/{response_id}", response_model=None, responses=_JSON_OR_SSE | error_responses(400, 404))
async def get_response(
    response_id: str,
    request: Request,
    jobs: JobsDep,
    caller: CallerDep,
    stream: bool = False,
    starting_after: Annotated[
        int | None, Query(ge=0, description="with stream: events after this one")
    ] = None,
    include: NoInclude = None,
    include_obfuscation: Annotated[bool | None, Query(description="only false")] = None,
) -> Response:
    """The response as it is now; with ``stream=true`` its events from the start (or after the
    one numbered ``starting_after``) until its end, from any front."""
    _refuse_include(request)
    if include_obfuscation:
        raise ApiError(400, "stream obfuscation is not offered by this server", param="include_obfuscation")
    if starting_after is not None and not stream:
        raise ApiError(400, "starting_after goes with stream=true", param="starting_after")
    record = await load_record(jobs, response_id, caller.name)
    view = await jobs.view(record.id, caller.name)
    headers = {JOB_HEADER: record.id}
    if not stream:
        return JSONResponse(response_of(record, view), headers=headers)
    events = jobs.follow(view, "0-0", request)
    body = _reattached(events, record, starting_after)
    return StreamingResponse(body, media_type="text/event-stream", headers=STREAM_HEADERS | headers)


@router.post("/{response_id}/cancel", responses=error_responses(400, 404, 409))
async def cancel_response(response_id: str, jobs: JobsDep, caller: CallerDep) -> dict[str, Any]:
    """Cancel a queued or running response (its job leaves the queue, or stops at its next
    token); a cancelled one is answered as it is; 409 if it had ended otherwise. Only a
    background response, as OpenAI's, or a detached one (``X-Streamq-Detach``): a foreground
    one's request is waiting for it, and would get a cancelled response as if it were its answer
    (it stops when that request goes away)."""
    record = await load_record(jobs, response_id, caller.name)
    if not record.runs_on:
        raise ApiError(
            400,
            f"response '{response_id}' was not created with background=true: only a background "
            "response can be cancelled, as OpenAI's (or one sent with X-Streamq-Detach: 1); a "
            "foreground one stops when its request's connection closes (POST /v1/jobs/{id}/cancel "
            "stops any job)",
        )
    try:
        view = await jobs.cancel(record.id, caller.name)
    except ApiError as exc:
        if exc.status != 409:
            raise
        view = await jobs.view(record.id, caller.name)
        if view.status != JobStatus.CANCELED:
            raise ApiError(
                409,
                f"response '{response_id}' has already ended ({response_status(view)})",
                code="response_already_ended",
                headers={"x-should-retry": "false"},  # the SDK would send it again, to the same end
            ) from None
    return response_of(record, view)


@router.delete("/{response_id}", responses=error_responses(400, 404))
async def delete_response(response_id: str, jobs: JobsDep, caller: CallerDep) -> dict[str, Any]:
    """Forget the response (a running background or detached one is canceled first; a foreground
    one, whose request is waiting for it, only once it has ended); its job stays readable through
    ``/v1/jobs`` until it expires."""
    record = await load_record(jobs, response_id, caller.name)
    view = await jobs.view(record.id, caller.name)
    if view.status not in FINAL_STATUSES:
        if not record.runs_on:
            raise ApiError(
                400,
                f"response '{response_id}' is a foreground one still running (for the request that "
                "created it, unless that request has just gone): delete it once it has ended",
            )
        await _cancel_quietly(jobs, record.id, caller.name)
    await jobs.delete_response(record.id, caller.name)
    return {"id": record.response_id, "object": "response.deleted", "deleted": True}


@router.get("/{response_id}/input_items", responses=error_responses(400, 404))
async def list_input_items(
    response_id: str,
    request: Request,
    jobs: JobsDep,
    caller: CallerDep,
    after: Annotated[str | None, Query(description="the item id the previous page ended at")] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    order: Literal["asc", "desc"] = "desc",
    include: NoInclude = None,
) -> dict[str, Any]:
    """The response's input items (not those of earlier turns), newest first unless ``order=asc``."""
    _refuse_include(request)
    record = await load_record(jobs, response_id, caller.name)
    if not record.store:
        raise ApiError(
            400,
            f"response '{response_id}' was created with store: false: its input was not kept",
            param="response_id",
        )
    return item_list(record.input_items, after, limit, order)
