"""The parts of the job API both clients share: where things are, what a submit sends, what an
answer means. No I/O here: the sync and async clients send what this builds."""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, TypedDict
from urllib.parse import quote

import httpx

from shared.job_store.vocabulary import JobStatus
from shared.schemas import ChatMessage, JobView
from streamq.errors import StreamqConnectionError, StreamqError, StreamqJobError, error_from_response

DEFAULT_URL = "http://127.0.0.1:8000"
API_KEY_ENV = "STREAMQ_API_KEY"
URL_ENV = "STREAMQ_URL"


class JobOptions(TypedDict, total=False):
    """The sampling and limit fields of ``POST /v1/jobs`` (see the README's API section)."""

    model: str
    max_tokens: int
    max_length: int
    temperature: float
    top_p: float
    top_k: int
    stop: str | list[str]
    seed: int
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logit_bias: dict[str, float]
    response_format: dict[str, Any]
    tools: list[dict[str, Any]]
    logprobs: int
    prompt_logprobs: int
    raw_prompt: str | list[int]
    queue_ttl: int
    timeout: int


# A message: a ChatMessage, or its JSON as a mapping (role, content, and an assistant's
# tool_calls, a tool's tool_call_id, a name: all sent as given, for the front to validate).
Message = ChatMessage | Mapping[str, Any]


def default_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def base_headers(api_key: str | None) -> dict[str, str]:
    """Headers every request carries: the Bearer key (argument, else ``STREAMQ_API_KEY``)."""
    key = api_key if api_key is not None else os.environ.get(API_KEY_ENV)
    if key and not (key.isascii() and key.isprintable()):  # httpx's own error named no key
        where = "api_key" if api_key is not None else API_KEY_ENV
        raise ValueError(f"{where} is not an API key: a key is printable ASCII (an sk-... string)")
    head = {"User-Agent": "streamq-client/0.1"}
    if key:
        head["Authorization"] = f"Bearer {key}"
    return head


def base_url(url: str | None) -> str:
    """The front's URL; ValueError for one the client cannot send to (no http:// or https://:
    each request would fail as if the front were down, and a stream retry for half a minute)."""
    chosen = (url or default_url()).rstrip("/")
    if httpx.URL(chosen).scheme not in ("http", "https"):
        raise ValueError(f"streamq: the front's URL must start with http:// or https://, not {chosen!r}")
    return chosen


def limits(max_connections: int | None) -> httpx.Limits:
    """The connection pool: ``max_connections`` at once (None: no cap; httpx's default of 100
    made the 101st request wait behind 100 open streams, then fail as if the front were down)."""
    return httpx.Limits(max_connections=max_connections, max_keepalive_connections=20)


def job_path(job_id: str, suffix: str = "") -> str:
    """A job's route; the id escaped, so that no id reaches another route."""
    return f"/v1/jobs/{quote(job_id, safe='')}{suffix}"


# Seconds a chat() given up on (Ctrl-C, a timeout) spends cancelling its job on the way out.
ABANDON_TIMEOUT = 3.0


def default_timeout(read: float) -> httpx.Timeout:
    """Connect fast, and give a stream ``read`` seconds between bytes (the front pings every 15 s
    by default, so a silent connection is a dead one)."""
    return httpx.Timeout(connect=5.0, read=read, write=30.0, pool=30.0)


def job_body(
    messages: Sequence[Message] | None,
    prompt: str | None,
    history: Sequence[tuple[str, str]] | None,
    options: Mapping[str, Any],
) -> dict[str, Any]:
    """The JSON body of ``POST /v1/jobs``; the front validates it (a 400 names a bad field)."""
    body: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
    if messages is not None:
        body["messages"] = [
            m.model_dump(exclude_none=True) if isinstance(m, ChatMessage) else dict(m) for m in messages
        ]
    if prompt is not None:
        body["prompt"] = prompt
    if history is not None:
        body["history"] = [list(turn) for turn in history]
    return body


# A submit is sent again after a dropped connection or a gateway's 502/504 (the front may have
# made the job, or not) and after a stopping front's 503 (it did not), up to this many sends in
# all, with one Idempotency-Key: the front answers the job the first send made, if it made one.
SUBMIT_SENDS = 4
SUBMIT_WAIT_CAP = 30.0  # seconds at most between two sends, whatever a Retry-After asks
IDEMPOTENCY_HEADER = "Idempotency-Key"


def submit_headers(idempotency_key: str | None) -> dict[str, str]:
    """The submit's key: the caller's, or a new random one (each submit() call its own)."""
    return {IDEMPOTENCY_HEADER: idempotency_key or uuid.uuid4().hex}


def submit_again_in(sends: int, error: StreamqError, delay: float) -> float:
    """Seconds to wait before sending again a submit whose ``sends``-th send failed with
    ``error`` (``delay``: the client's backoff for it); raises ``error`` when it is not one to
    send again, or after the last send."""
    again = error.status in (None, 502, 504) or (error.status == 503 and error.code == "front_stopping")
    if not again or sends >= SUBMIT_SENDS or isinstance(error, StreamqJobError):
        raise error
    asked = error.retry_after if error.retry_after is not None and math.isfinite(error.retry_after) else 0.0
    return min(max(delay, asked), SUBMIT_WAIT_CAP)


def error_of(response: httpx.Response) -> StreamqError:
    """The API's error for an answer (its body must have been read)."""
    return error_from_response(response.status_code, response.content, response.headers)


def check(response: httpx.Response) -> None:
    """Raise the API's error for a non-2xx answer (its body must have been read)."""
    if response.status_code >= 300:
        raise error_of(response)


def job_view(response: httpx.Response) -> JobView:
    check(response)
    return JobView.model_validate(response.json())


def model_ids(response: httpx.Response) -> list[str]:
    check(response)
    return [str(m["id"]) for m in response.json().get("data", [])]


def finished(view: JobView) -> JobView:
    """A finished job's view; StreamqJobError (``.job`` is the view) for one that failed, was
    canceled or expired: ``chat()``'s answer is a finished one or an exception."""
    if view.status != JobStatus.FINISHED:
        raise StreamqJobError(view)
    return view


def unreachable(url: str, exc: httpx.HTTPError) -> StreamqError:
    return StreamqConnectionError(f"cannot reach {url}: {exc.__class__.__name__}: {exc}")
