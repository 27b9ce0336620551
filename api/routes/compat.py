"""The seed's API, kept for its clients (ChatGLM-6B's api.py and its streaming variant).

``POST /`` waits and answers ``{response, history, status, time}``; ``POST /stream`` sends
chunks that are each ``<^>`` followed by the whole answer so far. Both run as ordinary jobs;
when their client goes away, the job is canceled, as the seed stopped generating then.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field

from api.errors import job_failure_error
from api.job_stream import ClientGone, JobEvent, follow_job
from api.state import Front, get_front
from api.stream_hub import StreamInterrupted
from shared.job_state import EVENT_DELTA, EVENT_DONE, EVENT_ERROR
from shared.schemas import JobRequest, SamplingFields, Text

log = logging.getLogger("streamq.api")
router = APIRouter(tags=["chatglm-compatible"])
FrontDep = Annotated[Front, Depends(get_front)]
MARKER = "<^>"
JOB_HEADER = "X-Streamq-Job-Id"  # lets a client poll, cancel or re-attach to the job


class ChatGLMRequest(SamplingFields):
    """ChatGLM-6B's request, with its defaults."""

    prompt: Text
    history: list[tuple[Text, Text]] | None = None
    max_length: int | None = Field(2048, ge=1, strict=True, description="prompt + answer tokens")
    temperature: float | None = Field(0.95, ge=0, le=2, strict=True)
    top_p: float | None = Field(0.7, gt=0, le=1, strict=True)

    def job_request(self) -> JobRequest:
        return JobRequest.model_validate(self.model_dump())


def _cancel_soon(front: Front, job_id: str) -> None:
    """Cancel the job without waiting (the client is gone; the request may be torn down)."""

    async def cancel() -> None:
        with contextlib.suppress(Exception):
            await front.jobs.cancel(job_id)

    task = asyncio.get_running_loop().create_task(cancel())
    front.background.add(task)
    task.add_done_callback(front.background.discard)


async def _next_output(events: AsyncGenerator[JobEvent | None, None]) -> JobEvent:
    """The next delta or final event (queue positions and keep-alive ticks are skipped); an
    interrupted stream reads as a final error event."""
    try:
        async for event in events:
            if event is not None and (event.event == EVENT_DELTA or event.final):
                return event
    except StreamInterrupted as exc:
        return JobEvent.of(None, EVENT_ERROR, {"type": "stream_interrupted", "message": str(exc)})
    raise RuntimeError("the job's event stream ended without a final event")


async def _start(
    front: Front, body: ChatGLMRequest, request: Request
) -> tuple[str, AsyncGenerator[JobEvent | None, None]]:
    view = await front.jobs.submit(body.job_request())
    s = front.settings
    events = follow_job(
        front.jobs, front.hub, view.id, view.model, "0-0", request, s.ping_interval, s.position_poll_interval
    )
    return view.id, events


@router.post("/", responses={400: {}, 409: {}, 502: {}, 503: {}})
async def chat(body: ChatGLMRequest, request: Request, response: Response, front: FrontDep) -> Any:
    """Answer one chat turn, waiting for the whole answer."""
    job_id, events = await _start(front, body, request)
    response.headers[JOB_HEADER] = job_id
    answer = ""
    try:
        while True:
            event = await _next_output(events)
            if event.event == EVENT_DELTA:
                answer += event.data.get("text", "")
                continue
            if event.event != EVENT_DONE:
                raise job_failure_error(event.event, event.data)
            break
    except ClientGone:
        _cancel_soon(front, job_id)
        return Response(status_code=499)
    except asyncio.CancelledError:
        _cancel_soon(front, job_id)
        raise
    finally:
        await events.aclose()
    history = [list(turn) for turn in body.history or []] + [[body.prompt, answer]]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return {"response": answer, "history": history, "status": 200, "time": now}


@router.post(
    "/stream",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/plain": {}}}, 400: {}, 409: {}, 502: {}, 503: {}},
)
async def chat_stream(body: ChatGLMRequest, request: Request, front: FrontDep) -> Response:
    """Stream one chat turn: every chunk is ``<^>`` + the whole answer so far.

    An error before any output is an HTTP error; one after it is a last chunk holding the
    error envelope (``<^>{"error": ...}``)."""
    job_id, events = await _start(front, body, request)
    try:
        first = await _next_output(events)
    except (ClientGone, asyncio.CancelledError) as exc:
        _cancel_soon(front, job_id)
        await events.aclose()
        if isinstance(exc, ClientGone):
            return Response(status_code=499)
        raise
    if first.final and first.event != EVENT_DONE:
        await events.aclose()
        raise job_failure_error(first.event, first.data)

    async def chunks() -> AsyncIterator[str]:
        answer = ""
        event = first
        try:
            while True:
                if event.event == EVENT_DELTA:
                    answer += event.data.get("text", "")
                    yield MARKER + answer
                elif event.final:
                    if event.event != EVENT_DONE:
                        yield MARKER + json.dumps(job_failure_error(event.event, event.data).envelope())
                    elif not answer:
                        yield MARKER
                    return
                event = await _next_output(events)
        except ClientGone:
            _cancel_soon(front, job_id)
        except asyncio.CancelledError:
            _cancel_soon(front, job_id)
            raise
        finally:
            await events.aclose()

    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8", headers={JOB_HEADER: job_id})
