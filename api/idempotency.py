"""``Idempotency-Key`` on job creation: a request sent again (its answer was lost on the way, a
page reloaded while it was being sent) gets the job the first one made, not a second job.

The job's id is ``HMAC(secret, key name, idempotency key)``, the secret a random one kept in Redis
(``keys.IDEMPOTENCY_SECRET``, made by the first front that needs it): the same on every front, and
no one can work it out from the key alone (a guessed key is no way to another client's job). A
request with a key first looks its job up (``JobService``), before the quotas and checks a new
job goes through, so a request sent again is answered whatever the rate limit or the workers say
now; the ``submit`` script, which creates a job only where its id has none, settles two sent at
once. The job keeps a fingerprint of the request as the client sent it (the body, whatever the
front's defaults), so the key sent with another request is a 400 (as Stripe's), not that other
request's job. A key is remembered as long as its job is (until ``STREAMQ_RESULT_TTL`` after its
end); after that it makes a new job. A job a front withdrew (no Redis replica had it in time:
the request was answered 503) is forgotten, so the key sent again makes it anew.

The routes that create a job a client follows on its own connection (chat and legacy
completions, a Responses request without ``background``, the seed's routes) refuse the header:
a job sent again there would have been canceled when the first connection went away.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Header, Request
from pydantic import BaseModel

from api.errors import ApiError

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


@dataclass(frozen=True)
class Idempotent:
    """A request's Idempotency-Key, with the fingerprint of the body it came with."""

    key: str
    fingerprint: str

    @classmethod
    def of(cls, header: str | None, body: BaseModel) -> Idempotent | None:
        key = checked(header)
        return None if key is None else cls(key, fingerprint(body))

    def job_id(self, secret: bytes, owner: str) -> str:
        """The id of the job this key makes for ``owner`` (another key name's same key: another job)."""
        return hmac.new(secret, f"{owner}\0{self.key}".encode(), hashlib.sha256).hexdigest()[:32]


def fingerprint(body: BaseModel) -> str:
    """The request as the client sent it (its validated body), to tell the request sent again
    from another one with the same key."""
    return hashlib.sha256(body.model_dump_json().encode()).hexdigest()


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
    if value is not None:  # even one that is not a key: the route takes none
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
