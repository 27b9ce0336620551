"""The job API over the in-memory job system: validation, the error envelope, auth, limits,
Last-Event-ID, cancel. Each test takes milliseconds."""

from __future__ import annotations

import json
from typing import Any

import anyio
import httpx
import pytest
from openai import NotFoundError

from api.shutdown import STOPPING
from tests.fast.conftest import KEY_A, KEY_B, Front, openai_of, settled

pytestmark = pytest.mark.anyio

HELLO = {"messages": [{"role": "user", "content": "hello there world"}]}


def events_of(body: str) -> list[tuple[str | None, str, dict[str, object]]]:
    """(id, event, data) of each SSE event in ``body``."""
    out = []
    for block in body.replace("\r\n", "\n").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in block.split("\n") if ": " in line and not line.startswith(":")
        )
        if "event" in fields:
            out.append((fields.get("id"), fields["event"], json.loads(fields["data"])))
    return out


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert "error" in body and set(body) <= {"error", "job"}, body
    error: dict[str, Any] = body["error"]
    assert {"message", "type", "param", "code"} <= set(error)
    return error


async def test_a_job_is_queued_then_answered(front: Front) -> None:
    created = await front.http.post("/v1/jobs", json=HELLO)
    assert created.status_code == 202
    job = created.json()
    assert created.headers["location"] == f"/v1/jobs/{job['id']}"
    assert (job["status"], job["model"]) == ("queued", "fake-model")
    view = (await front.http.get(f"/v1/jobs/{job['id']}")).json()
    assert (view["status"], view["text"], view["finish_reason"]) == ("finished", "hello there world", "stop")
    assert view["usage"]["completion_tokens"] == 3


async def test_invalid_requests_get_the_error_envelope_naming_the_field(front: Front) -> None:
    bad_temperature = {**HELLO, "temperature": 7}
    response = await front.http.post("/v1/jobs", json=bad_temperature)
    assert response.status_code == 400
    assert "temperature" in str(_error(response)["param"])

    response = await front.http.post("/v1/jobs", json={"messages": []})
    assert 400 <= response.status_code < 500
    assert _error(response)["message"]

    response = await front.http.post(
        "/v1/jobs", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and _error(response)["code"] == "invalid_json"  # as OpenAI
    # So the OpenAPI document lists no 422 (FastAPI's "Validation Error") on any route.
    spec = (await front.http.get("/openapi.json")).json()
    statuses = [set(op["responses"]) for ops in spec["paths"].values() for op in ops.values()]
    assert statuses and not [s for s in statuses if "422" in s]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    assert "HTTPValidationError" not in json.dumps(spec)  # nothing names what is gone
    assert "400" in spec["paths"]["/v1/jobs"]["post"]["responses"]

    response = await front.http.post(
        "/v1/jobs", content=b'{"prompt": "h\xffi"}', headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and _error(response)["code"] == "invalid_json", response.text
    assert "not valid JSON" in _error(response)["message"]
    response = await front.http.post(  # past what Python's JSON reader takes: no place to name
        "/v1/jobs", content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"}
    )
    assert response.status_code == 400 and _error(response)["code"] == "too_deep", response.text
    assert _error(response)["message"].startswith("the body is nested more than 160 levels deep")
    for body in (b"null", b""):  # JSON's null, or nothing at all
        response = await front.http.post(
            "/v1/jobs", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, response.text
        assert _error(response)["message"] == "the request body is missing or null: send a JSON object"


@pytest.mark.parametrize(
    ("route", "body", "param", "says"),
    [
        ("/v1/jobs", {"prompt": "hi", "stop": ["ok", "\ud83d"]}, "stop.1", "valid Unicode"),
        ("/v1/jobs", {"raw_prompt": [5, -1]}, "raw_prompt.1", "greater than or equal to 0"),
        ("/v1/jobs", {"prompt": "hi", "stop": 5}, "stop", "valid string"),
        ("/v1/completions", {"prompt": "\ud800"}, "prompt", "valid Unicode"),
        ("/v1/responses", {"input": "\ud800"}, "input", "valid Unicode"),
        # A check of the whole request names the field it is about.
        ("/v1/jobs", {"messages": []}, "messages", "must not be empty"),
        # A job's turns as OpenAI's: content (but an assistant's), calls from the assistant, no
        # field it would drop.
        ("/v1/jobs", {"messages": [{"role": "user"}]}, "messages.0", "a 'user' message needs 'content'"),
        ("/v1/jobs", {"messages": [{"role": "tool"}]}, "messages.0", "a 'tool' message needs 'content'"),
        (
            "/v1/jobs",
            {
                "messages": [
                    {"role": "user", "content": "x", "tool_calls": []},
                    {
                        "role": "user",
                        "content": "y",
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}}],
                    },
                ]
            },
            "messages.1",
            "only an 'assistant' message has 'tool_calls'",
        ),
        (
            "/v1/jobs",
            {"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y", "cache": 1}]},
            "messages.1",
            "a message has no field 'cache'",
        ),
        (
            "/v1/jobs",
            {
                "messages": [
                    {"role": "assistant", "content": "x", "refusal": "no"},
                    {"role": "user", "content": "y"},
                ]
            },
            "messages.0",
            "a message has no field 'refusal'",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
            "stream_options",
            "goes with 'stream'",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
            "top_logprobs",
            "needs",
        ),
        # A union of a literal and a model: the model's class is no field.
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "tool_choice": "requried"},
            "tool_choice",
            "'none', 'auto' or 'required'",
        ),
        # Two fields at fault: both are said, the first named.
        (
            "/v1/jobs",
            {"messages": [{"role": "user", "content": 5}, {"role": "robot", "content": "x"}]},
            "messages.0.content",
            "messages.1.role: Input should be",
        ),
    ],
)
async def test_a_field_that_takes_several_shapes_is_named_as_sent(
    front: Front, route: str, body: dict[str, Any], param: str, says: str
) -> None:
    """A field that takes a string or a list (a union, to pydantic) is named as the client sent
    it, and the complaint is the one about the shape it was sent in."""
    sent = json.dumps({"model": "fake-model", **body})  # \ud800 stays an escape, as clients send it
    response = await front.http.post(route, content=sent, headers={"content-type": "application/json"})
    error = _error(response)
    assert response.status_code == 400 and error["param"] == param, error
    assert says in error["message"] and "[" not in error["message"].split(":")[0], error


async def test_a_field_the_job_api_does_not_know_is_refused_by_name(front: Front) -> None:
    response = await front.http.post("/v1/jobs", json={**HELLO, "frobnicate": 1})
    assert response.status_code == 400
    assert _error(response)["param"] == "frobnicate"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"max_tokens": 4}, "messages"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "prompt"),
        ({"messages": [{"role": "user", "content": "b"}], "raw_prompt": "a"}, "raw_prompt"),
    ],
)
async def test_a_missing_or_doubled_input_names_its_field(
    front: Front, body: dict[str, Any], param: str
) -> None:
    response = await front.http.post("/v1/jobs", json=body)
    assert (response.status_code, _error(response)["param"]) == (400, param), response.text


async def test_server_limits_are_400s_that_name_the_field_and_setting(limited: Front) -> None:
    response = await limited.http.post("/v1/jobs", json={**HELLO, "max_tokens": 17})
    assert response.status_code == 400
    error = _error(response)
    assert error["param"] == "max_tokens" and "16" in str(error["message"])

    response = await limited.http.post("/v1/jobs", json={**HELLO, "stop": ["a", "b", "c"]})
    assert (response.status_code, _error(response)["param"]) == (400, "stop")

    big = {"messages": [{"role": "user", "content": "x" * 5000}]}
    response = await limited.http.post("/v1/jobs", json=big)
    assert response.status_code == 413
    _error(response)
    refused = await limited.http.post("/v1/jobs", json={"messages": "x"})  # rendered alike
    assert response.content.startswith(b'{"error":{"message":') and refused.content.startswith(
        b'{"error":{"message":'
    ), (response.content, refused.content)


async def test_unknown_jobs_and_routes_are_404s_in_the_envelope(front: Front) -> None:
    response = await front.http.get("/v1/jobs/" + "0" * 32)
    assert (response.status_code, _error(response)["code"]) == (404, "job_not_found")
    response = await front.http.get("/v1/nothing-here")
    assert response.status_code == 404
    _error(response)


async def test_api_keys_are_required_and_jobs_are_private_to_their_key(keyed: Front) -> None:
    response = await keyed.http.post("/v1/jobs", json=HELLO)
    assert response.status_code == 401
    _error(response)
    response = await keyed.http.post(
        "/v1/jobs", json=HELLO, headers={"Authorization": "Bearer sk-wrong-key-000000000000"}
    )
    assert response.status_code == 401

    a = {"Authorization": f"Bearer {KEY_A}"}
    b = {"Authorization": f"Bearer {KEY_B}"}
    job = (await keyed.http.post("/v1/jobs", json=HELLO, headers=a)).json()
    assert (await keyed.http.get(f"/v1/jobs/{job['id']}", headers=a)).status_code == 200
    other = await keyed.http.get(f"/v1/jobs/{job['id']}", headers=b)
    assert (other.status_code, _error(other)["code"]) == (404, "job_not_found")
    assert (await keyed.http.post(f"/v1/jobs/{job['id']}/cancel", headers=b)).status_code == 404
    assert (await keyed.http.get("/healthz")).status_code == 200  # probes stay open
    # Two Authorization headers (B's, then A's): which counts would depend on each proxy.
    both = [("Authorization", f"Bearer {KEY_B}"), ("Authorization", f"Bearer {KEY_A}")]
    twice = await keyed.http.get(f"/v1/jobs/{job['id']}", headers=both)
    assert (twice.status_code, _error(twice)["code"]) == (401, "invalid_api_key")
    assert "one 'Authorization' header" in _error(twice)["message"]


async def test_events_resume_after_last_event_id(front: Front) -> None:
    job = (await front.http.post("/v1/jobs", json=HELLO)).json()
    url = f"/v1/jobs/{job['id']}/events"
    whole = await front.http.get(url)
    assert whole.headers["content-type"].startswith("text/event-stream")
    events = events_of(whole.text)
    assert [name for _, name, _ in events] == ["queued", "started", "delta", "delta", "delta", "done"]
    assert (
        "".join(str(data.get("text", "")) for _, name, data in events if name == "delta")
        == "hello there world"
    )

    second_delta = events[3][0]
    rest = await front.http.get(url, headers={"Last-Event-ID": str(second_delta)})
    assert [(i, name) for i, name, _ in events_of(rest.text)] == [(i, name) for i, name, _ in events[4:]]

    final = await front.http.get(url, headers={"Last-Event-ID": str(events[-1][0])})
    assert final.status_code == 204  # it has every event: EventSource stops
    ms, seq = str(second_delta).split("-")  # an id between its events (one a crashed Redis lost)
    for lost in (f"{ms}-{int(seq) + 1}", "9999999999999-0"):
        refused = await front.http.get(url, headers={"Last-Event-ID": lost})
        assert (refused.status_code, _error(refused)["param"]) == (400, "Last-Event-ID"), lost
    garbage = await front.http.get(url, headers={"Last-Event-ID": "yesterday"})
    assert (garbage.status_code, _error(garbage)["param"]) == (400, "Last-Event-ID")
    empty = await front.http.get(url, headers={"Last-Event-ID": " "})  # none yet (EventSource's empty)
    assert [i for i, _, _ in events_of(empty.text)] == [i for i, _, _ in events]
    front.jobs.hold = True  # a job still queued: an id past its newest event is no event of it
    waiting = (await front.http.post("/v1/jobs", json=HELLO)).json()
    future = await front.http.get(
        f"/v1/jobs/{waiting['id']}/events", headers={"Last-Event-ID": "9999999999999-0"}
    )
    assert (future.status_code, _error(future)["param"]) == (400, "Last-Event-ID")


async def test_a_queued_job_cancels_once(front: Front) -> None:
    front.jobs.hold = True
    job = (await front.http.post("/v1/jobs", json=HELLO)).json()
    canceled = await front.http.post(f"/v1/jobs/{job['id']}/cancel")
    assert (canceled.status_code, canceled.json()["status"]) == (200, "canceled")
    again = await front.http.delete(f"/v1/jobs/{job['id']}")
    assert (again.status_code, _error(again)["code"]) == (409, "job_already_ended")
    assert again.json()["job"]["status"] == "canceled"
    events = events_of((await front.http.get(f"/v1/jobs/{job['id']}/events")).text)
    assert [name for _, name, _ in events] == ["queued", "canceled"]


async def test_responses_routes_this_server_lacks_are_404s_not_405s(front: Front) -> None:
    """``input_tokens`` and ``compact`` sit where a response id would (``/v1/responses/{id}``):
    the SDK's calls to them get the 404 of a route not offered (NotFoundError), not a 405 that
    suggests GET would work."""
    client = openai_of(front)
    with pytest.raises(NotFoundError) as missing:
        await client.responses.input_tokens.count(model="fake-model", input="x")
    assert missing.value.body["code"] == "unknown_url"  # type: ignore[index]
    response = await front.http.post("/v1/responses/compact", json={"model": "fake-model", "input": "x"})
    assert response.status_code == 404 and response.json()["error"]["code"] == "unknown_url"
    response = await front.http.post("/v1/responses/resp_" + "0" * 32, json={})
    assert response.status_code == 405  # a response's own path, another method


async def test_a_stopping_front_refuses_new_jobs_and_ends_the_waiting_requests(front: Front) -> None:
    """Once a stopping front has ended its streams (``api/shutdown.py``), a request that comes
    makes no job its client could no longer follow: a 503 to send again, elsewhere."""
    front.jobs.hold = True  # jobs wait: the requests below are waiting when the front stops
    chat = {"model": "fake-model", "max_tokens": 4, **HELLO}
    waiting: dict[str, Any] = {}
    async with anyio.create_task_group() as tasks:

        async def whole(name: str, headers: dict[str, str]) -> None:
            if name == "seed":  # the seed's stream, before its first chunk: an HTTP error still
                waiting[name] = await front.http.post("/stream", json={"prompt": "hi"})
                return
            if name == "seed-wait":
                waiting[name] = await front.http.post("/", json={"prompt": "hi"})
                return
            waiting[name] = await front.http.post("/v1/chat/completions", json=chat, headers=headers)

        cases: tuple[tuple[str, dict[str, str]], ...] = (
            ("tied", {}),
            ("detached", {"X-Streamq-Detach": "1"}),
            ("seed", {}),
            ("seed-wait", {}),
        )
        for name, headers in cases:
            front.jobs.submitted.clear()
            tasks.start_soon(whole, name, headers)
            await front.jobs.submitted.wait()
        await anyio.sleep(0.05)  # all wait on their jobs
        front.jobs.end_streams(STOPPING)
    for name, answer in waiting.items():
        assert answer.status_code == 503 and _error(answer)["type"] == "stream_interrupted", name
    # The client can only send it again (the SDK does at once): its job does not run beside that.
    tied, detached, seed = (
        front.jobs.jobs[waiting[n].headers["X-Streamq-Job-Id"]] for n in ("tied", "detached", "seed")
    )
    for name in ("tied", "seed", "seed-wait"):
        message = str(_error(waiting[name])["message"])  # no stream to resume: the request again
        assert message == "this front is stopping; its job is being canceled: send the request again", name
        assert waiting[name].headers["X-Streamq-Job-Id"] in front.jobs.jobs, name
    await settled(lambda: tied.view.status == "canceled" and seed.view.status == "canceled")
    assert detached.view.status == "queued"  # detached: it runs on, where the message says
    assert f"the job runs on: GET /v1/jobs/{detached.view.id}" in str(_error(waiting["detached"])["message"])
    jobs_before = len(front.jobs.jobs)
    late = await front.http.post("/v1/jobs", json=chat)
    assert late.status_code == 503 and late.headers["Retry-After"] == "1"
    assert _error(late)["code"] == "front_stopping" and len(front.jobs.jobs) == jobs_before


async def test_a_job_takes_an_answer_sent_back_as_the_openai_sdk_returns_it(front: Front) -> None:
    """The SDK's message (empty refusal, annotations, audio and function_call) goes back in the
    conversation as it is, as on the chat route."""
    from openai.types.chat import ChatCompletionMessage

    answer = ChatCompletionMessage(role="assistant", content="Paris.").model_dump()
    assert {"refusal", "annotations", "audio", "function_call"} <= answer.keys()
    messages = [
        {"role": "user", "content": "capital of France?"},
        answer,
        {"role": "user", "content": "and Peru?"},
    ]
    response = await front.http.post("/v1/jobs", json={"messages": messages})
    assert response.status_code == 202, response.text
