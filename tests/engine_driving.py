"""Driving an engine in a test: requests and jobs on the tiny model, a model stepped by hand
(``drive``) or the engine's thread (``running_engine``), and what they put out (``Collected``)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from shared.schemas import ChatMessage, GenerationRequest
from worker.engine import Engine, EngineJob, JobOutput

# A JSON schema the engine tests constrain answers to.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "color": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "color", "age", "tags"],
    "additionalProperties": False,
}


def request(prompt: str, **overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {
        "messages": [ChatMessage(role="user", content=prompt)],
        "max_tokens": 40,
        "temperature": 0.0,
        "top_p": 1.0,
    }
    return GenerationRequest(**(fields | overrides))


def alone(backend: Any, req: GenerationRequest) -> tuple[str, str | None]:
    steps = list(backend.generate(req))
    return "".join(s.delta for s in steps), steps[-1].finish_reason


def job(req: GenerationRequest, name: str = "") -> EngineJob:
    now = time.time()
    return EngineJob(name or f"job-{id(req)}", req, now, now, time.monotonic() + 600)


class Collected:
    """The engine's output, per job, as the publisher would receive it."""

    def __init__(self) -> None:
        self.outputs: list[tuple[int, JobOutput]] = []
        self.steps = 0
        self._lock = threading.Lock()
        self.changed = threading.Condition(self._lock)

    def put(self, outputs: list[JobOutput]) -> None:
        with self.changed:
            self.steps += 1
            self.outputs += [(self.steps, o) for o in outputs]
            self.changed.notify_all()

    def text(self, j: EngineJob) -> str:
        return "".join(o.text for _, o in self.outputs if o.job is j)

    def end(self, j: EngineJob) -> JobOutput | None:
        return next((o for _, o in self.outputs if o.job is j and o.finish_reason), None)

    def wait(self, condition: Any, timeout: float = 60) -> None:
        with self.changed:
            assert self.changed.wait_for(condition, timeout), "timed out"


def drive(model: Any, jobs: list[EngineJob], join_at: dict[int, list[EngineJob]]) -> Collected:
    """Step the model by hand: ``jobs`` from the start, others joining at given steps."""
    seen = Collected()
    for j in jobs:
        model.add(j)
    step = 0
    while model.ready_in() == 0 or any(s > step for s in join_at):
        step += 1
        for j in join_at.get(step, []):
            model.add(j)
        if model.ready_in() == 0:
            seen.put(model.step())
    return seen


@contextlib.contextmanager
def running_engine(model: Any) -> Iterator[tuple[Engine, Collected]]:
    """The engine stepping ``model`` in a thread of its own, its output collected."""
    seen = Collected()
    engine = Engine(model, seen)
    engine.start()
    try:
        yield engine, seen
    finally:
        engine.stop()
