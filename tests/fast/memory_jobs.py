"""An in-memory ``JobClient`` for the fast tier: the front's routes, auth, validation, error
envelope and formats run as in production, over a job system that lives in one dict.

Its "model" answers the last user message back, one word per token (``max_tokens`` cuts it with
finish_reason ``length``), so a test knows the answer to expect. With ``hold`` set, new jobs stay
queued until ``release``; with ``pause_after`` = n, they stop after n words until ``release``: a
test can then cancel a queued or a running job, or read a stream mid-way.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import secrets
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from api import idempotency
from api.auth import Caller
from api.errors import ApiError, front_stopping
from api.idempotency import Idempotent
from api.job_client import Events, JobEvent, StreamInterrupted
from api.metrics import FrontMetrics
from api.request_limits import generation_request
from api.stream_hub import parse_entry_id
from shared.job_store.payloads import Canceled, Delta, Done, Failed, Queued, Started
from shared.job_store.vocabulary import FINAL_STATUSES, EventName, FinishReason, JobStatus
from shared.logprobs import TokenLogprob, TopLogprob
from shared.schemas import GenerationRequest, JobError, JobRequest, JobView, Timings, Usage
from shared.settings import Settings


@dataclass
class MemoryJob:
    view: JobView
    owner: str
    request: GenerationRequest
    events: list[JobEvent] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    written: int = 0  # words of the answer sent
    fingerprint: str = ""  # with an Idempotency-Key: what was asked


def answer_words(request: GenerationRequest) -> list[str]:
    """What the fake model answers: the last message (or a raw prompt), word by word; token
    ids answer as words ``t<id>``."""
    if request.token_ids is not None:
        source = " ".join(f"t{token}" for token in request.token_ids)
    elif request.text is not None:
        source = request.text
    else:
        source = request.messages[-1].content
    words = source.split()
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def fake_logprob(word: str, rank: int, alternatives: int) -> TokenLogprob:
    """The fake model's logprob entry of a word: -0.5, its alternatives lower by rank."""
    top = [
        TopLogprob(token=f"{word}~{i}" if i else word, logprob=-0.5 * (i + 1), bytes=list(word.encode()))
        for i in range(alternatives)
    ]
    return TokenLogprob(
        token=word, logprob=-0.5 if rank else None, bytes=list(word.encode()), top_logprobs=top
    )


class MemoryJobClient:
    def __init__(self, settings: Settings, models: tuple[str, ...] = ("fake-model",)) -> None:
        self.settings = settings
        self.models = models
        self.jobs: dict[str, MemoryJob] = {}
        self.hold = False
        self.pause_after: int | None = None
        self.fail_with: JobError | None = None  # set: jobs fail with it once started, as a worker's would
        self.submitted = asyncio.Event()  # set at each submit (a test waits for its job)
        self.responses: dict[str, tuple[str, str]] = {}  # job id → (owner, Responses API record)
        self._clock = itertools.count(1_700_000_000_000)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.ended_streams: str | None = None  # end_streams' reason (the front is stopping)

    @classmethod
    def opener(cls, **kwargs: Any) -> Any:
        """``create_app(open_jobs=...)`` for a fresh client; the app keeps it in ``state.jobs``."""

        async def open_jobs(settings: Settings, metrics: FrontMetrics) -> MemoryJobClient:
            return cls(settings, **kwargs)

        return open_jobs

    # ----- the job system's side ----------------------------------------------------------------
    def _append(self, job: MemoryJob, event: str, data: str) -> None:
        job.events.append(JobEvent(f"{next(self._clock)}-0", event, data))
        job.changed.set()
        job.changed = asyncio.Event()

    def _end(self, job: MemoryJob, status: JobStatus, event: str, data: str, reason: FinishReason) -> None:
        job.view.status, job.view.finish_reason, job.view.finished_at = status, reason, time.time()
        self._append(job, event, data)

    def release(self) -> None:
        """Run every job that waits (after ``hold`` or ``pause_after``) to its end."""
        self.hold, self.pause_after = False, None
        for job in self.jobs.values():
            if job.view.status in (JobStatus.QUEUED, JobStatus.RUNNING):
                self._run(job)

    def _run(self, job: MemoryJob) -> None:
        if job.view.status == JobStatus.QUEUED:
            job.view.status, job.view.started_at, job.view.worker = JobStatus.RUNNING, time.time(), "memory"
            self._append(job, EventName.STARTED, Started(worker="memory.0", attempt=1).encode())
        if self.fail_with is not None:
            job.view.error = self.fail_with
            failed = Failed(**self.fail_with.model_dump()).encode()
            self._end(job, JobStatus.FAILED, EventName.ERROR, failed, FinishReason.ERROR)
            return
        words = answer_words(job.request)
        out = words[: job.request.max_tokens]
        stop_at = len(out) if self.pause_after is None else min(len(out), self.pause_after)
        request = job.request
        for word in out[job.written : stop_at]:
            job.view.text += word
            job.written += 1
            job.view.usage = Usage(prompt_tokens=len(job.request.messages), completion_tokens=job.written)
            delta = Delta(text=word)
            if request.logprobs is not None:
                delta.logprobs = [fake_logprob(word, 1, request.logprobs)]
            if request.prompt_logprobs is not None and job.written == 1:
                delta.prompt_logprobs = [
                    fake_logprob(w, i, request.prompt_logprobs if i else 0) for i, w in enumerate(words)
                ]
            self._append(job, EventName.DELTA, delta.encode())
        if job.written < len(out):
            return  # paused
        reason = FinishReason.LENGTH if len(out) < len(words) else FinishReason.STOP
        timings = Timings(
            queue_seconds=0, first_token_seconds=0, generation_seconds=0, tokens_per_second=None
        )
        done = Done(finish_reason=reason, usage=job.view.usage, timings=timings)
        self._end(job, JobStatus.FINISHED, EventName.DONE, done.encode(), reason)

    # ----- the JobClient boundary -------------------------------------------------------------
    async def submit(
        self, request: JobRequest, caller: Caller, idempotent: Idempotent | None = None
    ) -> JobView:
        if self.ended_streams is not None:
            raise front_stopping(self.ended_streams)
        generation = generation_request(request, self.settings)
        model = request.model or self.models[0]
        if model not in self.models:
            raise ApiError(404, f"model '{model}' is not served", param="model", code="model_not_found")
        job_id, fingerprint = secrets.token_hex(16), ""
        if idempotent is not None:  # as api.idempotent_jobs does
            job_id, fingerprint = idempotent.job_id(b"fast-tier", caller.name), idempotent.fingerprint
            if (made := self.jobs.get(job_id)) is not None:
                if made.fingerprint != fingerprint:
                    raise idempotency.reused()
                return made.view.as_replayed()
        view = JobView(id=job_id, model=model, status=JobStatus.QUEUED, created_at=time.time())
        job = MemoryJob(view, caller.name, generation, fingerprint=fingerprint)
        self.jobs[view.id] = job
        self._append(job, EventName.QUEUED, Queued(model=model).encode())
        if not self.hold:
            self._run(job)
        self.submitted.set()
        return view.model_copy(update={"status": JobStatus.QUEUED, "text": ""})

    def _job(self, job_id: str, owner: str) -> MemoryJob:
        job = self.jobs.get(job_id)
        if job is None or job.owner != owner:
            raise ApiError(404, f"no job with id '{job_id}'", param="id", code="job_not_found")
        return job

    async def view(self, job_id: str, owner: str, *, brief: bool = False) -> JobView:
        return self._job(job_id, owner).view.model_copy()

    async def cancel(self, job_id: str, owner: str) -> JobView:
        job = self._job(job_id, owner)
        if job.view.status in FINAL_STATUSES:
            raise ApiError(
                409,
                f"job '{job_id}' has already ended ({job.view.status})",
                code="job_already_ended",
                body={"job": job.view.model_dump(mode="json")},
            )
        data = Canceled(completion_tokens=job.view.usage.completion_tokens).encode()
        self._end(job, JobStatus.CANCELED, EventName.CANCELED, data, FinishReason.CANCELED)
        return job.view.model_copy()

    async def follow(self, job: JobView, after: str, request: Request | None) -> Events:
        record = self.jobs[job.id]
        mark = parse_entry_id(after)
        sent = 0
        while True:
            if self.ended_streams is not None:
                raise StreamInterrupted(self.ended_streams)
            fresh = [e for e in record.events[sent:] if parse_entry_id(e.id or "0-0") > mark]
            sent = len(record.events)
            for event in fresh:
                yield event
                if event.final:
                    return
            changed = record.changed
            try:
                await asyncio.wait_for(changed.wait(), self.settings.ping_interval)
            except TimeoutError:
                yield None

    def end_streams(self, reason: str) -> None:
        self.ended_streams = reason
        for record in self.jobs.values():  # wake every follower
            record.changed.set()
            record.changed = asyncio.Event()

    async def resume_point(self, job_id: str, event_id: tuple[int, int]) -> tuple[str | None, bool]:
        job = self.jobs.get(job_id)
        events = job.events if job else []
        exact = "-".join(map(str, event_id))
        return (events[-1].id if events else None), any(e.id == exact for e in events)

    async def save_response(self, job_id: str, owner: str, record: str) -> None:
        self.responses[job_id] = (owner, record)

    async def load_response(self, job_id: str, owner: str) -> str | None:
        owned, record = self.responses.get(job_id, (None, ""))
        return record if owned == owner and job_id in self.jobs else None

    async def delete_response(self, job_id: str, owner: str) -> bool:
        if self.responses.get(job_id, (None, ""))[0] != owner:
            return False
        del self.responses[job_id]
        return True

    async def served_models(self) -> dict[str, float]:
        return dict.fromkeys(self.models, 1_700_000_000.0)

    async def readiness(self) -> dict[str, Any]:
        """As the front's: not ready while a model of STREAMQ_MODELS has no worker."""
        served = dict.fromkeys(self.models, 1) | {
            m: 0 for m in self.settings.model_list() if m not in self.models
        }
        return {"ready": all(served.values()), "redis": True, "models": served}

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task
