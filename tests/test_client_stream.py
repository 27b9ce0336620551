"""The Python client's pure parts: the SSE parser, the resume policy, the terminal's row wrapping."""

from __future__ import annotations

import pytest
from rich.cells import cell_len

from shared.job_store.vocabulary import FINAL_EVENTS
from shared.schemas import StreamEvent
from streamq.errors import StreamqConnectionError, StreamqError, error_from_response
from streamq.render import printable, wrap_rows
from streamq.resume import Backoff, ResumeState
from streamq.sse import SSEParser


def parse(lines: list[str]) -> list[StreamEvent]:
    parser = SSEParser()
    return [e for e in (parser.feed(line) for line in lines) if e is not None]


def test_the_parser_reads_the_fronts_events() -> None:
    events = parse(
        [
            "retry: 1000",
            "",
            "id: 1-0",
            "event: queued",
            'data: {"model":"m","position":2,"estimated_wait_seconds":1.5}',
            "",
            ": ping",
            "event: queued",  # a live position update: no id
            'data: {"model":"m","position":0}',
            "",
            "id: 2-0",
            "event: delta",
            'data: {"text":',  # data over two lines is joined with a newline
            'data: "hello"}',
            "",
            "id: 3-0",
            "event: done",
            'data: {"finish_reason":"stop","usage":{"prompt_tokens":3,"completion_tokens":1},'
            '"timings":{"queue_seconds":0.1,"first_token_seconds":0.2,"generation_seconds":0.3,'
            '"tokens_per_second":3.3}}',
            "",
        ]
    )
    assert [(e.id, e.event) for e in events] == [
        ("1-0", "queued"),
        (None, "queued"),
        ("2-0", "delta"),
        ("3-0", "done"),
    ]
    assert events[0].position == 2 and events[1].position == 0
    assert events[2].text == "hello"
    done = events[3].done()
    assert done is not None and done.finish_reason == "stop" and done.usage.completion_tokens == 1
    assert events[3].final and not events[2].final


def test_final_events_are_the_ones_the_job_store_writes_last() -> None:
    names = ["queued", "started", "delta", *FINAL_EVENTS]
    assert {n for n in names if StreamEvent(event=n).final} == set(FINAL_EVENTS)


def test_the_parser_gives_delta_text_and_errors() -> None:
    lines = ["id: 5-0", "event: delta", 'data: {"text":"hi"}', ""]
    delta, error = parse([*lines, "event: error", 'data: {"type":"t","message":"m"}', ""])
    assert delta.text == "hi" and error.text == ""
    job_error = error.job_error()
    assert job_error is not None and (job_error.type, job_error.message) == ("t", "m")


def test_resume_state_sends_the_last_event_id_and_ends_on_the_final_event() -> None:
    state = ResumeState("j1", None, Backoff())
    assert "Last-Event-ID" not in state.headers()
    state.saw(StreamEvent(id="7-0", event="delta", data={"text": "a"}))
    state.saw(StreamEvent(id=None, event="queued", data={"position": 1}))  # no id: keeps 7-0
    assert state.headers()["Last-Event-ID"] == "7-0"
    assert not state.ended
    assert state.opened(204) is False and state.ended  # 204: the final event was already received
    other = ResumeState("j2", "1-0", Backoff())
    other.saw(StreamEvent(id="2-0", event="canceled"))
    assert other.ended


def test_backoff_grows_to_its_cap_and_gives_up_after_its_attempts() -> None:
    backoff = Backoff(initial=0.5, factor=2, cap=3, max_attempts=5, jitter=0)
    state = ResumeState("j", None, backoff)
    waits = [state.dropped("cut") for _ in range(5)]
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]
    with pytest.raises(StreamqConnectionError):
        state.dropped("cut")
    fresh = ResumeState("j", None, backoff)
    fresh.dropped("cut")
    fresh.dropped("cut")
    fresh.saw(StreamEvent(id="1-0", event="delta"))  # progress: the count starts again
    assert fresh.dropped("cut") == 0.5


def test_only_temporary_errors_are_retried_and_retry_after_is_honoured() -> None:
    state = ResumeState("j", None, Backoff(initial=0.1, jitter=0))
    busy = error_from_response(503, b'{"error":{"message":"m","type":"t"}}', {"retry-after": "2"})
    assert state.failed(busy) == 2.0
    envelope = b'{"error":{"message":"no job","type":"not_found_error","param":"id"}}'
    gone = error_from_response(404, envelope, {})
    with pytest.raises(StreamqError) as raised:
        state.failed(gone)
    assert (raised.value.status, raised.value.type, raised.value.param) == (404, "not_found_error", "id")
    odd = error_from_response(502, b"<html>bad gateway</html>", {})
    assert odd.status == 502 and "bad gateway" in odd.message


def test_a_submit_is_sent_again_only_when_its_answer_may_be_lost_and_waits_at_most_the_cap() -> None:
    from streamq.protocol import SUBMIT_SENDS, SUBMIT_WAIT_CAP, submit_again_in

    assert submit_again_in(1, StreamqConnectionError("cut"), 0.25) == 0.25
    for status in (502, 504):
        assert submit_again_in(2, StreamqError("gateway", status=status), 0.5) == 0.5
    assert (
        submit_again_in(1, StreamqError("stopping", status=503, code="front_stopping", retry_after=1.0), 0.25)
        == 1.0
    )
    for after in (86400.0, float("inf"), float("nan")):  # a Retry-After never holds it longer than the cap
        assert (
            submit_again_in(1, StreamqError("slow", status=502, retry_after=after), 0.25) <= SUBMIT_WAIT_CAP
        )
    for error in (
        StreamqError("busy", status=429, retry_after=1.0),
        StreamqError("no worker", status=503, code="model_unavailable"),
        StreamqError("bad", status=400),
    ):
        with pytest.raises(StreamqError):
            submit_again_in(1, error, 0.25)
    with pytest.raises(StreamqConnectionError):
        submit_again_in(SUBMIT_SENDS, StreamqConnectionError("cut"), 0.25)


@pytest.mark.parametrize("width", [8, 13, 40])
def test_rows_rebuild_the_text_fit_the_width_and_only_the_last_row_changes(width: int) -> None:
    text = "lorem ipsum  dolor sit amet, 你好世界你好世界 consecteturadipiscingelitseddoeiusmod tempor"
    rows = wrap_rows(text, width)
    assert "".join(rows) == text
    assert all(cell_len(r.rstrip()) <= width for r in rows)
    for cut in range(1, len(text)):
        prefix_rows = wrap_rows(text[:cut], width)
        assert prefix_rows[:-1] == rows[: len(prefix_rows) - 1]  # printed rows never change


def test_printable_text_cannot_drive_the_terminal() -> None:
    assert printable("a\x1b[2Jb\r\n\tc\x07") == "a\ufffd[2Jb\n    c\ufffd"


def test_a_key_that_cannot_be_one_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's "…" pasted as a key failed deep in httpx with a UnicodeEncodeError."""
    from streamq import AsyncStreamqClient, StreamqClient

    with pytest.raises(ValueError, match="api_key is not an API key"):
        StreamqClient("http://127.0.0.1:8000", api_key="…")
    monkeypatch.setenv("STREAMQ_API_KEY", "sk-key\n")
    with pytest.raises(ValueError, match="STREAMQ_API_KEY is not an API key"):
        AsyncStreamqClient("http://127.0.0.1:8000")
    monkeypatch.setenv("STREAMQ_API_KEY", "sk-a-real-key")
    with StreamqClient("http://127.0.0.1:8000") as client:
        assert client._http.headers["Authorization"] == "Bearer sk-a-real-key"
