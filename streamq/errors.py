"""The API's error envelope as a typed exception: ``{"error": {message, type, param, code}}``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shared.schemas import JobView


class StreamqError(Exception):
    """An error answered by the API (``status`` set), or none (``status`` None): the front out of
    reach (StreamqConnectionError), or a job that did not finish (StreamqJobError).

    ``type``, ``message``, ``param`` and ``code`` are the envelope's members; ``body`` is the
    whole JSON answer (a 409 from cancel carries the ended job there: see ``job``)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        type: str = "api_error",
        param: str | None = None,
        code: str | None = None,
        body: Mapping[str, Any] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.body = dict(body or {})
        self.retry_after = retry_after

    @property
    def job(self) -> JobView | None:
        """The job view an error carries (409 ``job_already_ended``), if any."""
        job = self.body.get("job")
        return JobView.model_validate(job) if isinstance(job, dict) else None

    def __str__(self) -> str:
        where = f" ({self.param})" if self.param else ""
        head = f"{self.status} {self.type}" if self.status is not None else self.type
        return f"{head}{where}: {self.message}"


class StreamqConnectionError(StreamqError):
    """The front could not be reached, or a stream could not be resumed within the retry policy
    (then ``job_id`` and ``last_event_id`` say where to pick it up: ``events(job_id,
    last_event_id=...)``; the job itself may still run)."""

    def __init__(self, message: str, job_id: str | None = None, last_event_id: str | None = None) -> None:
        super().__init__(message, type="connection_error")
        self.job_id = job_id
        self.last_event_id = last_event_id


class StreamqJobError(StreamqError):
    """A job that ended without finishing (``chat()``): failed, canceled or expired. ``job`` is
    its final view; ``type``, ``message``, ``param`` and ``code`` are its error's (a cancel's:
    ``canceled``)."""

    def __init__(self, view: JobView) -> None:
        error = view.error
        message = error.message if error is not None else f"the job was {view.status}"
        super().__init__(
            f"job {view.id}: {message}",
            type=error.type if error is not None else str(view.status),
            param=error.param if error is not None else None,
            code=error.code if error is not None else None,
            body={"job": view.model_dump(mode="json")},
        )
        self._view = view

    def __reduce__(self) -> tuple[type[StreamqJobError], tuple[JobView]]:
        return StreamqJobError, (self._view,)  # pickled whole (a process pool's result)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    try:
        return max(0.0, float(headers.get("retry-after", "")))
    except ValueError:
        return None


def error_from_response(status: int, content: bytes, headers: Mapping[str, str]) -> StreamqError:
    """The exception for a non-2xx answer: the envelope when there is one, else the raw body."""
    try:
        body = json.loads(content or b"{}")
    except ValueError:
        body = None
    envelope = body.get("error") if isinstance(body, dict) else None
    if not isinstance(envelope, dict):
        text = content.decode(errors="replace").strip()[:500] or f"HTTP {status}"
        return StreamqError(text, status=status, retry_after=_retry_after(headers))
    assert isinstance(body, dict)
    return StreamqError(
        str(envelope.get("message") or f"HTTP {status}"),
        status=status,
        type=str(envelope.get("type") or "api_error"),
        param=envelope.get("param"),
        code=envelope.get("code"),
        body=body,
        retry_after=_retry_after(headers),
    )
