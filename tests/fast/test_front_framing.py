"""What begins, keeps alive and ends the front's streams, read as their users read them: the
seed's ``<^>`` stream (keep-alives that repeat the answer so far), the SSE streams through
httpx-sse (every event carries JSON data), and the error envelope for a route this server does
not offer. The in-memory job system holds jobs queued (``hold``) while keep-alives are due; the
fronts here tick every 0.2 s.

httpx's ASGI transport hands a response over once the app has finished it, so these tests read
whole bodies; tests/test_e2e_proxy.py reads the same streams live, through a read timeout."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn
from httpx_sse import ServerSentEvent, aconnect_sse
from openai import NotFoundError
from websockets.asyncio.client import connect as websocket_connect
from websockets.exceptions import InvalidStatus

from api.app import create_app
from api.auth import ApiKeys
from streamq.processes import free_port
from tests.fast.conftest import Front, _settings, open_front, openai_of
from tests.fast.memory_jobs import MemoryJobClient

pytestmark = pytest.mark.anyio

PING_INTERVAL = 0.2  # the fast fronts' STREAMQ_PING_INTERVAL
PAST_TWO_PINGS = 2.5 * PING_INTERVAL


@pytest.fixture
async def patient() -> AsyncIterator[Front]:
    """A front whose first keep-alive is due only after 30 s."""
    async for opened in open_front(_settings(ping_interval=30.0), ApiKeys([])):
        yield opened


async def _queued_job(front: Front) -> str:
    await front.jobs.submitted.wait()
    (job_id,) = front.jobs.jobs
    return job_id


# ----- the seed's POST /stream ---------------------------------------------------------------
def seed_answer(body: str) -> str:
    """What the seed's client keeps: the text after the last ``<^>``."""
    return body.split("<^>")[-1]


async def test_a_queued_seed_stream_begins_with_keep_alives_then_streams_the_answer(front: Front) -> None:
    front.jobs.hold = True
    streaming = asyncio.ensure_future(front.http.post("/stream", json={"prompt": "a b c"}))
    await _queued_job(front)
    await asyncio.sleep(PAST_TWO_PINGS)
    front.jobs.release()
    response = await streaming
    assert response.status_code == 200
    chunks = response.text.split("<^>")
    assert chunks[0] == ""  # the body is chunks, each opening with the marker
    keep_alives = chunks[1:].index("a")
    assert keep_alives >= 2 and chunks[1 : 1 + keep_alives] == [""] * keep_alives
    assert chunks[1 + keep_alives :] == ["a", "a b", "a b c"]
    assert seed_answer(response.text) == "a b c"


async def test_a_seed_stream_keep_alive_repeats_the_answer_so_far(front: Front) -> None:
    front.jobs.pause_after = 1  # one word, then a silence longer than the ping interval
    streaming = asyncio.ensure_future(front.http.post("/stream", json={"prompt": "x y"}))
    await _queued_job(front)
    await asyncio.sleep(PAST_TWO_PINGS)
    front.jobs.release()
    chunks = (await streaming).text.split("<^>")[1:]
    repeats = chunks.index("x y") - 1
    assert chunks[0] == "x" and repeats >= 2 and chunks[1 : 1 + repeats] == ["x"] * repeats
    assert chunks[-1] == "x y"


async def test_a_seed_stream_error_before_the_first_keep_alive_is_an_http_error(patient: Front) -> None:
    patient.jobs.hold = True
    streaming = asyncio.ensure_future(patient.http.post("/stream", json={"prompt": "x y"}))
    job_id = await _queued_job(patient)
    assert (await patient.http.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    response = await streaming
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "job_canceled"


async def test_a_seed_stream_error_after_a_keep_alive_is_the_last_chunk(front: Front) -> None:
    front.jobs.hold = True
    streaming = asyncio.ensure_future(front.http.post("/stream", json={"prompt": "x y"}))
    job_id = await _queued_job(front)
    await asyncio.sleep(PAST_TWO_PINGS)  # the response has begun with a keep-alive
    assert (await front.http.post(f"/v1/jobs/{job_id}/cancel")).status_code == 200
    response = await streaming
    assert response.status_code == 200
    chunks = response.text.split("<^>")[1:]
    assert chunks[:-1] and set(chunks[:-1]) == {""}
    assert json.loads(chunks[-1])["error"]["code"] == "job_canceled"


# ----- SSE through httpx-sse -----------------------------------------------------------------
async def _sse(front: Front, method: str, url: str, **kwargs: Any) -> list[ServerSentEvent]:
    async with aconnect_sse(front.http, method, url, **kwargs) as source:
        assert source.response.status_code == 200, await source.response.aread()
        return [sse async for sse in source.aiter_sse()]


async def _sse_of_held_job(front: Front, method: str, url: str, **kwargs: Any) -> list[ServerSentEvent]:
    """The stream's events; its job waits past two keep-alives, then runs."""
    reading = asyncio.ensure_future(_sse(front, method, url, **kwargs))
    await asyncio.sleep(PAST_TWO_PINGS)
    front.jobs.release()
    return await reading


async def test_job_events_through_httpx_sse_each_carry_json(front: Front) -> None:
    front.jobs.hold = True
    job_id = (await front.http.post("/v1/jobs", json={"prompt": "one two"})).json()["id"]
    events = await _sse_of_held_job(front, "GET", f"/v1/jobs/{job_id}/events")
    data = [json.loads(sse.data) for sse in events]  # no event without data: pings were sent
    assert [sse.event for sse in events] == ["queued", "started", "delta", "delta", "done"]
    assert (
        "".join(d["text"] for sse, d in zip(events, data, strict=True) if sse.event == "delta") == "one two"
    )
    assert events[0].retry == 1000 and all(sse.retry is None for sse in events[1:])
    assert all(sse.id for sse in events)

    # Re-attached after the queued event: keep-alives come first, ``retry`` with the first event.
    front.jobs.hold = True
    job_id = (await front.http.post("/v1/jobs", json={"prompt": "three"})).json()["id"]
    queued_id = front.jobs.jobs[job_id].events[0].id
    events = await _sse_of_held_job(
        front, "GET", f"/v1/jobs/{job_id}/events", headers={"Last-Event-ID": queued_id}
    )
    assert [(sse.event, json.loads(sse.data).get("text")) for sse in events] == [
        ("started", None),
        ("delta", "three"),
        ("done", None),
    ]
    assert events[0].retry == 1000


async def test_job_events_raw_keep_alives_are_comment_lines_inside_the_next_event(front: Front) -> None:
    front.jobs.hold = True
    job_id = (await front.http.post("/v1/jobs", json={"prompt": "one"})).json()["id"]
    reading = asyncio.ensure_future(front.http.get(f"/v1/jobs/{job_id}/events"))
    await asyncio.sleep(PAST_TWO_PINGS)
    front.jobs.release()
    body = (await reading).text
    assert body.startswith("retry: 1000\nid: ")
    assert body.count(": ping\n") >= 2
    blocks = body.split("\n\n")
    assert blocks[-1] == "" and all("\ndata: " in block for block in blocks[:-1])


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "one two"}]}),
        ("/v1/completions", {"prompt": "one two"}),
    ],
)
async def test_openai_streams_through_httpx_sse_each_carry_json(
    front: Front, path: str, body: dict[str, Any]
) -> None:
    front.jobs.hold = True
    events = await _sse_of_held_job(front, "POST", path, json={"model": "fake-model", "stream": True, **body})
    assert events[-1].data == "[DONE]"
    chunks = [json.loads(sse.data) for sse in events[:-1]]
    assert all(sse.event == "message" for sse in events)
    text = "".join(
        c["choices"][0].get("delta", {}).get("content") or c["choices"][0].get("text", "") for c in chunks
    )
    assert text == "one two"


# ----- routes this server does not offer -----------------------------------------------------
async def test_an_unknown_route_is_a_404_in_the_envelope_that_names_it(front: Front) -> None:
    client = openai_of(front)
    with pytest.raises(NotFoundError) as missing:
        await client.embeddings.create(model="fake-model", input="hello")
    assert missing.value.status_code == 404
    assert (
        "POST /v1/embeddings" in missing.value.message
        and "not offered by this server" in missing.value.message
    )
    assert missing.value.code == "unknown_url" and missing.value.type == "not_found_error"

    response = await front.http.get("/v1/files")
    assert response.status_code == 404
    assert response.json() == {
        "error": {
            "message": "Invalid URL (GET /v1/files): this route is not offered by this server "
            "(/docs lists its routes)",
            "type": "not_found_error",
            "param": None,
            "code": "unknown_url",
        }
    }


async def test_other_404s_and_a_wrong_method_keep_their_own_errors(front: Front) -> None:
    client = openai_of(front)
    with pytest.raises(NotFoundError) as no_model:
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    assert no_model.value.code == "model_not_found"
    no_job = await front.http.get("/v1/jobs/0123456789abcdef")
    assert (no_job.status_code, no_job.json()["error"]["code"]) == (404, "job_not_found")

    wrong = await front.http.get("/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"] == {
        "message": "GET is not allowed on /v1/chat/completions (allowed: POST)",
        "type": "invalid_request_error",
        "param": None,
        "code": "method_not_allowed",
    }
    put = await front.http.put("/v1/jobs/0123456789abcdef")  # GET and DELETE live on two routes
    assert put.status_code == 405 and put.headers["allow"] == "DELETE, GET"


async def test_a_websocket_upgrade_is_the_same_json_404_through_uvicorn() -> None:
    """The openai SDK's ``responses.connect()`` (and the Agents SDK's websocket transport) opens a
    WebSocket on ``/v1/responses``: uvicorn's own answer was a bare 403, which reads as a refused
    key. Through a real uvicorn server, as a WebSocket client sees it."""
    app = create_app(_settings(), ApiKeys([]), open_jobs=MemoryJobClient.opener())
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not serving.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        with pytest.raises(InvalidStatus) as refused:
            async with websocket_connect(f"ws://127.0.0.1:{port}/v1/responses"):
                pass
        answer = refused.value.response
        assert answer.status_code == 404
        assert answer.headers["content-type"] == "application/json"
        error = json.loads(answer.body)["error"]
        assert error["code"] == "unknown_url" and error["type"] == "not_found_error"
        assert "WebSocket /v1/responses" in error["message"] and "no WebSocket routes" in error["message"]
        async with httpx.AsyncClient() as http:  # counted as the error answers over HTTP are
            scraped = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        assert 'streamq_api_errors_total{code="unknown_url",status="404"} 1.0' in scraped, scraped
    finally:
        server.should_exit = True
        await serving
