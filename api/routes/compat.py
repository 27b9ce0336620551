"""The seed's API, kept for its clients (ChatGLM-6B's api.py and its streaming variant).

``POST /`` waits and answers ``{response, history, status, time}``; ``POST /stream`` sends
chunks that are each ``<^>`` followed by the whole answer so far (sent again as a keep-alive
after ``ping_interval`` seconds of silence). Both run as ordinary jobs; when their client goes
away, the job is canceled, as the seed stopped generating then.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import Field, field_validator

from api.auth import CallerDep
from api.body_checks import CheckedBodyRoute
from api.errors import BODY_READ_AS_JSON, ApiError, error_responses, renamed
from api.idempotency import NOT_IDEMPOTENT
from api.job_client import ClientGone, JobsDep
from api.request_job import JOB_HEADER, STREAM_HEADERS, RequestJob
from shared.job_store.vocabulary import EventName
from shared.schemas import JobRequest, SamplingFields, Text

log = logging.getLogger("streamq.api")

# What curl (``-d``) and HTML forms send as a body's type: the seed read any body as JSON.
_SENT_AS_FORM_OR_TEXT = ("application/x-www-form-urlencoded", "text/plain")


class SeedBodyRoute(CheckedBodyRoute):
    """A route of the seed's: its body is read as JSON whatever its Content-Type says, as the
    seed's ``await request.json()`` did. ChatGLM-6B's clients (``requests.post(url,
    data=json.dumps(...))``) send none (``strict_content_type=False`` below), and ``curl -d``
    without ``-H`` sends a form's; either was answered a 415."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def as_json(request: Request) -> Response:
            kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if not kind or kind in _SENT_AS_FORM_OR_TEXT:  # read as JSON: no 415 for its type
                request.scope[BODY_READ_AS_JSON] = True
            if kind in _SENT_AS_FORM_OR_TEXT:
                headers = [(k, v) for k, v in request.scope["headers"] if k != b"content-type"]
                request.scope["headers"] = [*headers, (b"content-type", b"application/json")]
                request = Request(request.scope, request.receive)
            return await handler(request)

        return as_json


router = APIRouter(
    route_class=SeedBodyRoute,
    tags=["chatglm-compatible"],
    strict_content_type=False,
    responses=error_responses(400, 401, 404, 409, 413, 415, 429, 502, 503, 504),
)
MARKER = "<^>"


class ChatGLMRequest(SamplingFields):
    """ChatGLM-6B's request, with its defaults."""

    prompt: Text
    history: list[tuple[Text, Text]] | None = None
    max_length: int | None = Field(2048, ge=1, strict=True, description="prompt + answer tokens")
    temperature: float | None = Field(0.95, ge=0, le=2, strict=True)
    top_p: float | None = Field(0.7, ge=0, le=1, strict=True)

    @field_validator("history", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        """Each turn a [query, response] pair: a ChatGLM3-style turn ({role, content}) was
        refused with pydantic's "Input should be a valid tuple"."""
        for index, turn in enumerate(value if isinstance(value, list) else []):
            if not isinstance(turn, list) or len(turn) != 2:
                raise ValueError(
                    f"each turn is a [query, response] pair of strings (ChatGLM-6B's history); turn "
                    f"{index} is not: send a chat as 'messages' to /v1/chat/completions"
                )
        return value

    def job_request(self) -> JobRequest:
        return JobRequest.model_validate(self.model_dump())


def _as_chatglm(exc: ApiError) -> ApiError:
    """An error named as this API's fields are: its ``prompt`` (with ``history``) where a job's
    error names the ``messages`` (a prompt too long for the model's context)."""
    return renamed(exc, "prompt" if exc.param == "messages" else None, "prompt")


@router.post("/", dependencies=[NOT_IDEMPOTENT])
async def chat(
    body: ChatGLMRequest, request: Request, response: Response, jobs: JobsDep, caller: CallerDep
) -> Any:
    """Answer one chat turn, waiting for the whole answer."""
    try:
        job = await RequestJob.submit(jobs, body.job_request(), request, caller)
        response.headers[JOB_HEADER] = job.id
        result = await job.whole_answer({JOB_HEADER: job.id})  # a raised error drops the response's
    except ApiError as exc:
        raise _as_chatglm(exc) from None
    if result is None:
        return Response(status_code=499)  # the client went away
    answer = result[0]
    history = [list(turn) for turn in body.history or []] + [[body.prompt, answer]]
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    return {"response": answer, "history": history, "status": 200, "time": now}


@router.post(
    "/stream",
    dependencies=[NOT_IDEMPOTENT],
    response_class=StreamingResponse,
    responses={200: {"content": {"text/plain": {}}}},
)
async def chat_stream(body: ChatGLMRequest, request: Request, jobs: JobsDep, caller: CallerDep) -> Response:
    """Stream one chat turn: every chunk is ``<^>`` + the whole answer so far.

    After ``ping_interval`` seconds without a chunk (the job waits in its queue, or between two
    tokens) the last chunk is sent again, as a keep-alive (``<^>`` alone before any output): a
    client that keeps the last chunk still holds the answer so far, and a proxy's read timeout
    sees bytes. An error that comes before the first keep-alive would be due is an HTTP error;
    once the response has begun, an error is a last chunk holding the error envelope
    (``<^>{"error": ...}``)."""
    try:
        job = await RequestJob.submit(jobs, body.job_request(), request, caller)
    except ApiError as exc:
        raise _as_chatglm(exc) from None
    try:
        first = await job.next_output(ticks=True)  # at most until the first keep-alive is due
    except (ClientGone, asyncio.CancelledError) as exc:
        job.client_gone()
        await job.close()
        if isinstance(exc, ClientGone):
            return Response(status_code=499)
        raise
    if first is not None and first.final and first.event != EventName.DONE:
        await job.close()
        error = job.failure(first)  # the seed's clients cannot re-attach: its job is canceled
        error.headers = {**(error.headers or {}), JOB_HEADER: job.id}
        raise _as_chatglm(error)

    async def chunks() -> AsyncIterator[str]:
        answer = ""
        event = first
        async with job.followed():
            while True:
                if event is None:  # a keep-alive: the answer so far, again
                    yield MARKER + answer
                elif event.event == EventName.DELTA:
                    answer += event.data.get("text", "")
                    yield MARKER + answer
                elif event.final:
                    if event.event != EventName.DONE:
                        error = _as_chatglm(job.failure(event))
                        yield MARKER + json.dumps(error.envelope())
                    elif not answer:
                        yield MARKER
                    return
                event = await job.next_output(ticks=True)

    # X-Accel-Buffering: nginx passes each chunk on at once, keep-alives included.
    headers = {JOB_HEADER: job.id, **STREAM_HEADERS}
    return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8", headers=headers)
