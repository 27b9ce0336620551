"""``Idempotency-Key`` on job creation: a request sent again (its answer was lost on the way, a
page reloaded while it was being sent) gets the job the first one made, not a second job.

The job's id is derived from the caller's key name and the client's idempotency key, so the
``submit`` script, which creates a job only where its id has none, is the whole check: no record
of its own, no extra Redis command, and the same on every front. The job keeps a fingerprint of
what was asked (the model and the generation request), so the key sent with another request is a
400 (as Stripe's), not that other request's job. A key is remembered as long as its job is (until
``STREAMQ_RESULT_TTL`` after its end); after that it makes a new job.

The routes that create a job a client follows on its own connection (chat and legacy
completions, a Responses request without ``background``, the seed's routes) refuse the header:
a job sent again there would have been canceled when the first connection went away.
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import Depends, Header, Request

from api.errors import ApiError
from shared.schemas import GenerationRequest

HEADER = "Idempotency-Key"
MAX_LENGTH = 255  # as Stripe's
REPLAYED = {"Idempotent-Replayed": "true"}  # the answer's header when the job existed (as Stripe's)

IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=HEADER,
        description="a key of the client's choosing (a UUID): the request sent again with it gets the "
        "job the first one made",
    ),
]


def checked(value: str | None) -> str | None:
    """The header's key, or a 400 naming it: 1-255 visible ASCII characters (spaces inside)."""
    if value is None:
        return None
    key = value.strip()
    if not key or len(key) > MAX_LENGTH or not all(" " <= c <= "~" for c in key):
        raise ApiError(
            400,
            f"{HEADER} must be 1 to {MAX_LENGTH} visible ASCII characters (a UUID, say)",
            param=HEADER,
            code="invalid_idempotency_key",
        )
    return key


def job_id(owner: str, key: str) -> str:
    """The id of the job ``key`` makes for ``owner``: another key name's same key is another job."""
    return hashlib.sha256(f"streamq idempotency\0{owner}\0{key}".encode()).hexdigest()[:32]


def fingerprint(model: str, request: GenerationRequest) -> str:
    """What a job was asked, to tell the request sent again from another one with the same key."""
    return hashlib.sha256(f"{model}\0{request.model_dump_json()}".encode()).hexdigest()


def reused() -> ApiError:
    return ApiError(
        400,
        f"this {HEADER} was sent before with another request: a key is for one request (and its "
        "retries) only",
        param=HEADER,
        code="idempotency_key_reused",
    )


def refuse(value: str | None, route: str) -> None:
    """A 400 for the header on a route whose job lives with its connection."""
    if value is not None:
        raise ApiError(
            400,
            f"{HEADER} is honoured by POST /v1/jobs and background responses only: {route} runs its "
            "job for this connection, and cancels it when the connection goes away",
            param=HEADER,
            code="unsupported_header",
        )


def not_here(request: Request) -> None:
    """The dependency of the routes that refuse the header."""
    refuse(request.headers.get(HEADER), f"{request.method} {request.url.path}")


NOT_IDEMPOTENT = Depends(not_here)
