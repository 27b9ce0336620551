"""The OpenAI-compatible API: ``POST /v1/chat/completions``, ``POST /v1/completions``,
``GET /v1/models``.

Each completion is an ordinary streamq job (its id in ``X-Streamq-Job-Id``, and in the
completion's id), followed for the client like the seed's routes follow theirs: when the client
goes away the job is canceled, unless the request set ``"background": true`` or sent
``X-Streamq-Detach: 1``. Errors use the API's one envelope, which is OpenAI's; an error after a
stream has begun is a last ``data:`` event holding that envelope (the openai SDK raises it as
an ``APIError``), with no ``[DONE]`` after it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from api.auth import OPEN, Caller, CallerDep
from api.body_checks import CheckedBodyRoute
from api.completion_request import COMPLETION_PARAMS, CompletionRequest
from api.errors import ApiError, error_responses, job_failure_error, renamed, unknown_url
from api.idempotency import NOT_IDEMPOTENT
from api.job_client import JobClient, JobsDep
from api.openai_format import (
    DONE,
    PING,
    CompletionFormat,
    CompletionStream,
    Kind,
    model_list,
    model_object,
    sse_data,
)
from api.openai_schemas import CHAT_PARAMS, ChatCompletionRequest, OpenAIFields
from api.request_job import JOB_HEADER, STREAM_HEADERS, DetachHeader, RequestJob, detach_requested
from api.tool_calls import ToolPlan
from shared.job_store.vocabulary import EventName
from shared.schemas import JobRequest

log = logging.getLogger("streamq.api")
router = APIRouter(
    route_class=CheckedBodyRoute,
    prefix="/v1",
    tags=["openai-compatible"],
    responses=error_responses(401, 503),
)
_ERRORS = error_responses(400, 404, 409, 413, 415, 429, 502, 504)


@router.post("/chat/completions", response_model=None, responses=_ERRORS, dependencies=[NOT_IDEMPOTENT])
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    jobs: JobsDep,
    caller: CallerDep,
    detach: DetachHeader = None,
) -> Response:
    """OpenAI's chat completion: a ``chat.completion``, or with ``stream`` the
    ``chat.completion.chunk`` events, then ``data: [DONE]``. Tool calls come back as
    ``tool_calls`` (see the README's field table for what each field does here)."""
    plan, length_field = body.tool_plan(), body.max_tokens_param()
    try:
        job_request = body.job_request()
    except ApiError as exc:
        raise _as_sent(exc, "chat", plan, length_field) from None
    extras = {"logprobs": bool(body.logprobs), "tools": plan, "max_tokens_param": length_field}
    return await _complete(jobs, request, caller, "chat", body, job_request, detach, extras)


@router.post("/completions", response_model=None, responses=_ERRORS, dependencies=[NOT_IDEMPOTENT])
async def completions(
    body: CompletionRequest,
    request: Request,
    jobs: JobsDep,
    caller: CallerDep,
    detach: DetachHeader = None,
) -> Response:
    """OpenAI's (legacy) text completion: the prompt (text or token ids) is given to the model
    as it is, with no chat template. A list of prompts (lm-evaluation-harness's batches) is a job
    each, answered together: choice *i* is prompt *i*'s (not streamed)."""
    prompts = body.prompts()
    job_requests = [body.job_request(prompt) for prompt in prompts]
    if len(prompts) == 1:
        extras = _text_extras(body, prompts[0])
        return await _complete(jobs, request, caller, "text", body, job_requests[0], detach, extras)
    if body.stream:
        message = f"a list of prompts ({len(prompts)}) is answered whole here: stream one prompt per request"
        raise ApiError(400, message, param="stream")
    return await _complete_each(jobs, request, caller, body, prompts, job_requests, detach)


def _text_extras(body: CompletionRequest, prompt: str | list[int]) -> dict[str, Any]:
    """How a text completion of ``prompt`` is written: with logprobs, and the prompt echoed
    (token ids: echoed as the worker's tokens spell them), alone for ``max_tokens: 0``."""
    echo = (prompt if isinstance(prompt, str) else "") if body.echo else None
    return {"logprobs": body.logprobs is not None, "echo": echo, "prompt_only": body.prompt_only}


@router.get("/models")
async def list_models(jobs: JobsDep) -> dict[str, Any]:
    """The models live workers serve right now (``created``: when the first of them started)."""
    return model_list(await jobs.served_models())


@router.get("/models/{model:path}", responses=error_responses(404))
async def get_model(model: str, request: Request, jobs: JobsDep) -> dict[str, Any]:
    """One served model; 404 ``model_not_found`` if no live worker serves it."""
    if not model or model.endswith("/"):  # a trailing slash, as on every other route
        raise unknown_url(request.method, request.url.path)
    since = await jobs.served_models()
    if model not in since:
        message = f"model '{model}' is not served by any live worker"
        raise ApiError(404, message, param="model", code="model_not_found")
    return model_object(model, since[model])


async def _complete(
    jobs: JobClient,
    request: Request,
    caller: Caller,
    kind: Kind,
    body: OpenAIFields,
    job_request: JobRequest,
    detach: str | None,
    extras: dict[str, Any],
) -> Response:
    try:
        job = await RequestJob.submit(
            jobs, job_request, request, caller, detached=detach_requested(body.background, detach)
        )
    except ApiError as exc:
        raise _as_sent(exc, kind, extras.get("tools"), extras.get("max_tokens_param", "max_tokens")) from None
    _log_end_user(body, job.id, kind)
    fmt = CompletionFormat(
        kind, job.id, job.view.model, int(job.view.created_at), body.include_usage, **extras
    )
    headers = {JOB_HEADER: job.id}
    if body.stream:
        return StreamingResponse(
            _stream(job, fmt), media_type="text/event-stream", headers=STREAM_HEADERS | headers
        )
    return await _wait(job, fmt, headers)


def _log_end_user(body: OpenAIFields, job_ids: str, kind: Kind) -> None:
    """The request's ``user`` and ``metadata``, logged with its job's id (or jobs')."""
    if body.end_user() or body.metadata:
        user = (body.end_user() or "")[:64]
        log.info("job %s: OpenAI %s completion for user %r, metadata %s", job_ids, kind, user, body.metadata)


def _as_sent(exc: ApiError, kind: Kind, tools: ToolPlan | None, max_tokens: str = "max_tokens") -> ApiError:
    """``exc`` naming the field as the client sent it: a job request's field (the prompt's
    ``messages`` on the completions route; ``max_tokens``, the name the client gave it), or
    ``tools`` for the schema a forced call was held to."""
    forced = tools is not None and tools.forces_call
    if forced and (exc.param or "").startswith("response_format"):
        sent: str | None = "tools"
    elif exc.param == "max_tokens":
        sent = max_tokens
    else:
        sent = (CHAT_PARAMS if kind == "chat" else COMPLETION_PARAMS).get(exc.param or "")
    return renamed(exc, sent, "messages" if kind == "chat" else "prompt")


async def _wait(job: RequestJob, fmt: CompletionFormat, headers: dict[str, str]) -> Response:
    """Wait for the whole answer; a job that ends without one is its HTTP error."""
    try:
        result = await job.whole_output(error_headers=headers)
    except ApiError as exc:
        raise _as_sent(exc, fmt.kind, fmt.tools, fmt.max_tokens_param) from None
    if result is None:
        return Response(status_code=499)  # the client went away
    done = result.done.data
    answer = fmt.response(
        result.text,
        done.get("finish_reason", "stop"),
        done.get("usage"),
        result.logprobs,
        result.prompt_logprobs,
    )
    return JSONResponse(answer, headers=headers)


async def _complete_each(
    jobs: JobClient,
    request: Request,
    caller: Caller,
    body: CompletionRequest,
    prompts: list[str | list[int]],
    job_requests: list[JobRequest],
    detach: str | None,
) -> Response:
    """A list of prompts: a job each, admitted one after another as if each were a request of
    its own (the caller's quotas count each), answered as one text completion whose choice *i*
    is prompt *i*'s answer, with the usage of all. Their ids are in ``X-Streamq-Job-Id``, comma
    separated. A job refused at submit cancels those before it, detached or not (the error
    names no job to follow); one that fails cancels the others unless detached."""
    most = jobs.settings.key_max_concurrent
    if most and caller.name != OPEN and len(prompts) > most:  # it could never be admitted whole
        message = (
            f"a list of {len(prompts)} prompts is {len(prompts)} jobs, more than this API key may have "
            f"at once ({most}, STREAMQ_KEY_MAX_CONCURRENT): send at most {most} per request"
        )
        raise ApiError(400, message, param="prompt", code="limit_exceeded")
    detached = detach_requested(body.background, detach)
    submitted: list[RequestJob] = []
    try:
        for job_request in job_requests:
            submitted.append(await RequestJob.submit(jobs, job_request, request, caller, detached=detached))
    except BaseException as exc:
        await _withdraw(jobs, caller, submitted, wait=isinstance(exc, ApiError))
        if not isinstance(exc, ApiError):
            raise
        refused = _as_sent(exc, "text", None)
        if refused.param == "prompt":  # which of the list
            refused.param = f"prompt.{len(submitted)}"
        raise refused from None
    _log_end_user(body, ",".join(job.id for job in submitted), "text")
    headers = {JOB_HEADER: ",".join(job.id for job in submitted)}
    waits = [asyncio.ensure_future(job.whole_output(error_headers=headers)) for job in submitted]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_EXCEPTION)
    finally:  # those still waiting (a job failed, or this request was torn down): canceled
        for wait in waits:
            wait.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
    for wait in waits:
        failure = None if wait.cancelled() else wait.exception()
        if isinstance(failure, ApiError):
            raise _as_sent(failure, "text", None) from None
        if failure is not None:
            raise failure
    results = [wait.result() for wait in waits]
    answers = []
    for job, prompt, result in zip(submitted, prompts, results, strict=True):
        if result is None:
            return Response(status_code=499)  # the client went away
        fmt = CompletionFormat(
            "text", job.id, job.view.model, int(job.view.created_at), **_text_extras(body, prompt)
        )
        done = result.done.data
        answers.append(
            fmt.response(
                result.text,
                done.get("finish_reason", "stop"),
                done.get("usage"),
                result.logprobs,
                result.prompt_logprobs,
            )
        )
    usage = {name: sum(answer["usage"][name] for answer in answers) for name in answers[0]["usage"]}
    choices = [answer["choices"][0] | {"index": index} for index, answer in enumerate(answers)]
    return JSONResponse(answers[0] | {"choices": choices, "usage": usage}, headers=headers)


async def _withdraw(jobs: JobClient, caller: Caller, submitted: list[RequestJob], *, wait: bool) -> None:
    """Cancel the jobs of a list that will not be answered, detached or not: with ``wait`` (a
    refusal) their ends are written before the answer, so a retry finds the key's quota free;
    without (the request torn down, or that wait cut short), at once, without waiting."""
    canceled = False
    try:
        if wait:
            ends = await asyncio.gather(
                *(jobs.cancel(job.id, caller.name) for job in submitted), return_exceptions=True
            )
            for job, end in zip(submitted, ends, strict=True):
                if isinstance(end, Exception) and not isinstance(end, ApiError):  # 409: ended already
                    log.warning("job %s: could not be canceled: %s", job.id, end)
            canceled = True
    finally:
        for job in submitted:
            if not canceled:
                job.detached = False
                job.client_gone()
            await job.close()


async def _stream(job: RequestJob, fmt: CompletionFormat) -> AsyncIterator[bytes]:
    """The chunks: the role, then one per delta, the one with the finish reason, the usage
    (when asked), ``[DONE]``. A keep-alive comment while the job waits in its queue."""
    chunks = CompletionStream(fmt)
    async with job.followed():
        for chunk in chunks.first():
            yield sse_data(chunk)
        while True:
            event = await job.next_output(ticks=True)
            if event is None:
                yield PING
            elif event.event == EventName.DELTA:
                for chunk in chunks.delta(event.data):
                    yield sse_data(chunk)
            elif event.event == EventName.DONE:
                for chunk in chunks.end(event.data.get("finish_reason", "stop"), event.data.get("usage")):
                    yield sse_data(chunk)
                yield DONE
                return
            else:
                failure = job_failure_error(event.event, event.data)
                error = _as_sent(failure, fmt.kind, fmt.tools, fmt.max_tokens_param)
                if error.type == "stream_interrupted":  # the job runs on: re-attach, not send again
                    error.message += f"; the job may still run: re-attach at /v1/jobs/{job.id}/events"
                    error.code = "stream_interrupted"
                yield sse_data(error.envelope())
                return
