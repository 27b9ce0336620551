"""What the API shows of a job: its view (``GET /v1/jobs/{id}``), and its events as a client
reads them."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, PrivateAttr

from shared.job_store.vocabulary import FINAL_EVENTS, EventName, FinishReason, JobStatus


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JobError(BaseModel):
    type: str
    message: str
    param: str | None = Field(None, description="the request field at fault, when one is")
    code: str | None = Field(None, description="OpenAI's error code, where it has one")


class JobView(BaseModel):
    """The state of one job as ``GET /v1/jobs/{id}`` shows it. Times are unix seconds."""

    id: str
    model: str
    status: JobStatus
    position: int | None = Field(None, description="0-based place in the model's queue while queued")
    estimated_wait_seconds: float | None = Field(
        None, description="while queued: (position + 1) / the model's drain rate; null when unknown"
    )
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage = Field(default_factory=Usage)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    error: JobError | None = None
    # Not shown: the view answers a request sent again with its Idempotency-Key (the job existed).
    _replayed: bool = PrivateAttr(False)

    @property
    def replayed(self) -> bool:
        return self._replayed

    def as_replayed(self) -> JobView:
        view = self.model_copy()
        view._replayed = True
        return view


class Timings(BaseModel):
    queue_seconds: float
    first_token_seconds: float | None
    generation_seconds: float
    tokens_per_second: float | None


class DoneEvent(BaseModel):
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


class StreamEvent(BaseModel):
    """One event of ``GET /v1/jobs/{id}/events`` as a client reads it: ``queued`` (position),
    ``started``, ``delta`` ({text}), then one of ``done`` / ``error`` / ``canceled``. ``id`` is the
    event's stream entry id (the Last-Event-ID to resume from); None for a live position update."""

    id: str | None = None
    event: str
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.event in FINAL_EVENTS

    @property
    def text(self) -> str:
        """A delta's text ("" for other events)."""
        return str(self.data.get("text") or "") if self.event == EventName.DELTA else ""

    @property
    def position(self) -> int | None:
        """A ``queued`` event's 0-based place in the queue (None when unknown or another event)."""
        value = self.data.get("position") if self.event == EventName.QUEUED else None
        return value if isinstance(value, int) else None

    def done(self) -> DoneEvent | None:
        return DoneEvent.model_validate(self.data) if self.event == EventName.DONE else None

    def job_error(self) -> JobError | None:
        return JobError.model_validate(self.data) if self.event == EventName.ERROR else None
