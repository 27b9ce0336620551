"""The mapping of a job's events to the Responses API's events (``api.responses_format``), fed
directly: it is a function of the job's stored events alone, so a requeued job's stream (after a
worker's crash) numbers its events as one run's, and a failed job ends as ``response.failed``."""

from __future__ import annotations

from typing import Any

from api.job_client import JobEvent
from api.responses_format import ResponseEvents
from api.responses_store import ResponseRecord

MODEL = "fake-model"


def _record(background: bool = False) -> ResponseRecord:
    return ResponseRecord(id="ab" * 16, model=MODEL, created_at=1_700_000_000.0, background=background)


def _fed(events: list[tuple[str, dict[str, Any]]], background: bool = False) -> list[dict[str, Any]]:
    mapped = ResponseEvents(_record(background))
    out: list[dict[str, Any]] = []
    for n, (name, data) in enumerate(events):
        out += mapped.feed(JobEvent.of(f"{1_700_000_000_000 + n}-0", name, data))
    return out


def test_a_requeued_job_gives_the_same_events_as_one_run() -> None:
    once = [("queued", {}), ("started", {}), ("delta", {"text": "a"}), ("delta", {"text": " b"})]
    requeued: list[tuple[str, dict[str, Any]]] = [
        *once[:3],
        ("queued", {"requeued": True, "attempt": 1}),
        ("started", {}),
        once[3],
    ]
    done = ("done", {"finish_reason": "stop", "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
    assert _fed([*requeued, done]) == _fed([*once, done])
    live = ResponseEvents(_record())
    assert live.feed(JobEvent(None, "queued", '{"position": 3}')) == []  # a live position is no event


def test_only_a_background_response_is_ever_queued() -> None:
    """As OpenAI's: a foreground response is in_progress from its creation, whether its job waits
    in the queue or not; a background one is queued until its job starts."""
    job = [("queued", {}), ("started", {}), ("delta", {"text": "a"})]
    foreground, background = _fed(job), _fed(job, background=True)
    assert [(e["type"], e["response"]["status"]) for e in foreground[:2]] == [
        ("response.created", "in_progress"),
        ("response.in_progress", "in_progress"),
    ]
    assert [(e["type"], e["response"]["status"]) for e in background[:3]] == [
        ("response.created", "queued"),
        ("response.queued", "queued"),
        ("response.in_progress", "in_progress"),
    ]
    assert [e["type"] for e in foreground[2:]] == [e["type"] for e in background[3:]]


def test_a_failed_job_ends_with_an_error_event_and_response_failed() -> None:
    failed = _fed([("queued", {}), ("error", {"type": "worker_lost", "message": "gone"})])
    assert [e["type"] for e in failed] == [
        "response.created",
        "response.in_progress",
        "error",
        "response.failed",
    ]
    assert failed[2]["message"] == "gone" and failed[2]["sequence_number"] == 2
    assert failed[-1]["response"]["error"] == {
        "code": "server_error",
        "message": "gone",
        "type": "worker_lost",
    }
