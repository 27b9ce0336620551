"""OpenAI's Responses API through the official SDK over the in-memory job system: a response is
a job; its events and their numbering, ``starting_after``, cancel, delete, input items,
``previous_response_id`` chains, function calls, and refusals naming the field. The fake model
answers the last message back, one word per token."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from openai import BadRequestError
from openai.types.responses import EasyInputMessageParam, Response

from tests.fast.conftest import KEY_A, KEY_B, Front, openai_of
from tests.fast.responses_calls import ADD, CLOSE, MODEL, PLAIN, events_of, job_request, turns
from tests.response_items import item_text

pytestmark = pytest.mark.anyio


async def test_a_response_is_a_job_with_its_text_and_usage(front: Front) -> None:
    client = openai_of(front)
    raw = await client.responses.with_raw_response.create(
        model=MODEL, input="one two three", instructions="be brief", metadata={"k": "v"}
    )
    response = raw.parse()
    job_id = raw.headers["x-streamq-job-id"]
    assert response.id == f"resp_{job_id}" and response.object == "response"
    assert (response.status, response.output_text, response.model) == ("completed", "one two three", MODEL)
    assert response.usage is not None and response.usage.output_tokens == 3
    assert response.usage.total_tokens == response.usage.input_tokens + 3
    Response.model_validate(raw.http_response.json())  # every field the SDK's type requires
    assert (response.instructions, response.metadata, response.background) == ("be brief", {"k": "v"}, False)
    assert turns(front, response.id) == [("system", "be brief"), ("user", "one two three")]
    job = (await front.http.get(f"/v1/jobs/{job_id}")).json()
    assert (job["status"], job["text"]) == ("finished", response.output_text)
    again = await client.responses.retrieve(response.id)
    assert again.model_dump() | {"completed_at": None} == response.model_dump() | {"completed_at": None}
    newline = await front.http.get(f"/v1/responses/{response.id}%0A")  # another id, not this one
    assert newline.status_code == 404 and newline.json()["error"]["param"] == "response_id"

    assert response.reasoning is not None and response.reasoning.effort is None
    cut = await client.responses.create(
        model=MODEL, input="one two three", max_output_tokens=2, reasoning={"effort": "none"}
    )
    assert cut.reasoning is not None and cut.reasoning.effort == "none"  # echoed, as OpenAI's
    assert (cut.status, cut.output_text) == ("incomplete", "one two")
    assert cut.incomplete_details is not None and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete"  # type: ignore[union-attr]


async def test_the_events_are_numbered_from_the_jobs_stream(front: Front) -> None:
    client = openai_of(front)
    stream = await client.responses.create(model=MODEL, input="alpha beta", stream=True, temperature=0)
    events = [event async for event in stream]
    assert [e.type for e in events] == [
        *PLAIN,
        "response.output_text.delta",
        "response.output_text.delta",
        *CLOSE,
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "alpha beta"
    assert events[0].response.status == "in_progress"  # type: ignore[union-attr]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.status == "completed" and final.output_text == "alpha beta"
    assert final.temperature == 0

    # The same events, the same numbers, read again (a re-attach replays the job's stream).
    replay = await events_of(client, final.id)
    assert [e.model_dump() for e in replay] == [e.model_dump() for e in events]
    for n in (0, 4, 6, len(events) - 2, len(events) - 1):
        tail = await events_of(client, final.id, after=n)
        assert [e.model_dump() for e in tail] == [e.model_dump() for e in events[n + 1 :]]
    polled = await client.responses.retrieve(final.id)
    assert [item.model_dump() for item in polled.output] == [item.model_dump() for item in final.output]

    async with client.responses.stream(response_id=final.id, starting_after=5) as resumed:
        numbers = [event.sequence_number async for event in resumed]
        assert (await resumed.get_final_response()).output_text == "alpha beta"
    assert numbers == list(range(6, len(events)))


async def test_a_background_stream_read_while_it_runs_numbers_as_a_replay(front: Front) -> None:
    client = openai_of(front)
    front.jobs.pause_after = 2  # two words out, then the job waits
    response = await client.responses.create(model=MODEL, input="a b c d", background=True)
    assert response.status == "queued" and response.background is True
    running = await client.responses.retrieve(response.id)
    assert (running.status, running.output_text) == ("in_progress", "a b")
    assert running.output[0].status == "in_progress"  # type: ignore[union-attr]
    live = asyncio.ensure_future(events_of(client, response.id, after=4))
    await asyncio.sleep(0.05)
    front.jobs.release()
    tail = await live
    whole = await events_of(client, response.id)
    assert [e.model_dump() for e in tail] == [e.model_dump() for e in whole[5:]]
    assert whole[-1].response.output_text == "a b c d"


async def test_keep_alives_are_comment_lines_inside_the_next_event(front: Front) -> None:
    front.jobs.hold = True  # the job waits in its queue past two keep-alives (0.2 s apart)
    created = await front.http.post("/v1/responses", json={"input": "one", "background": True})
    url = f"/v1/responses/{created.json()['id']}?stream=true"
    reading = asyncio.ensure_future(front.http.get(url))
    await asyncio.sleep(0.5)
    front.jobs.release()
    body = (await reading).text
    assert body.startswith("event: response.created\n") and body.count(": ping\n") >= 2
    blocks = body.split("\n\n")
    assert blocks[-1] == "" and all("\ndata: " in block for block in blocks[:-1])
    assert (await front.http.get(url)).text == body.replace(": ping\n", "")  # the same events, read again


async def test_input_ending_with_an_assistant_or_developer_message_is_answered(front: Front) -> None:
    """As OpenAI takes it: the model answers after the last item, in a new turn."""
    client = openai_of(front)
    lasts: list[EasyInputMessageParam] = [
        {"role": "assistant", "content": "me last"},
        {"role": "developer", "content": "be brief"},
    ]
    for last in lasts:
        response = await client.responses.create(model=MODEL, input=[{"role": "user", "content": "hi"}, last])
        assert response.status == "completed" and response.output_text
        role = "system" if last["role"] == "developer" else last["role"]
        assert turns(front, response.id) == [("user", "hi"), (role, last["content"])]


async def test_input_items_are_listed_newest_first_and_paged(front: Front) -> None:
    client = openai_of(front)
    given: Any = [
        {"role": "developer", "content": "be kind"},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "first"}]},
        {"role": "assistant", "content": [{"type": "output_text", "text": "ok", "annotations": []}]},
        {"role": "user", "content": "second"},
    ]
    response = await client.responses.create(model=MODEL, input=given)
    assert turns(front, response.id) == [
        ("system", "be kind"),
        ("user", "first"),
        ("assistant", "ok"),
        ("user", "second"),
    ]
    newest_first = await client.responses.input_items.list(response.id)
    texts = [item_text(item) for item in newest_first.data]
    assert texts == ["second", "ok", "first", "be kind"]
    assert newest_first.data[1].type == "message" and newest_first.data[1].role == "assistant"
    paged = [item.id async for item in client.responses.input_items.list(response.id, limit=1, order="asc")]
    assert paged == [item.id for item in reversed(newest_first.data)] and len(set(paged)) == 4
    bad = await front.http.get(f"/v1/responses/{response.id}/input_items", params={"after": "nope"})
    assert (bad.status_code, bad.json()["error"]["param"]) == (400, "after")


async def test_a_previous_response_id_chain_carries_the_conversation(front: Front) -> None:
    client = openai_of(front)
    first = await client.responses.create(model=MODEL, input="hello there", instructions="first only")
    second = await client.responses.create(model=MODEL, input="and more", previous_response_id=first.id)
    third = await client.responses.create(model=MODEL, input="the end", previous_response_id=second.id)
    assert third.previous_response_id == second.id
    assert turns(front, third.id) == [
        ("user", "hello there"),
        ("assistant", "hello there"),
        ("user", "and more"),
        ("assistant", "and more"),
        ("user", "the end"),
    ]  # instructions are not carried over
    items = await client.responses.input_items.list(third.id)
    assert [item_text(item) for item in items.data] == ["the end"]

    unstored = await client.responses.create(model=MODEL, input="forget me", store=False)
    # openai 3's Response declares no store field; the SDK keeps the one the server sent as an extra.
    assert unstored.store is False and unstored.output_text == "forget me"  # type: ignore[attr-defined]
    _, saved = front.jobs.responses[unstored.id.removeprefix("resp_")]
    assert "forget me" not in saved  # its input is not kept (the job's own request is, for its run)
    with pytest.raises(BadRequestError) as refused:
        await client.responses.create(model=MODEL, input="go on", previous_response_id=unstored.id)
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]
    assert refused.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    assert "store: false" in refused.value.body["message"]  # type: ignore[index]
    with pytest.raises(BadRequestError):
        await client.responses.input_items.list(unstored.id)
    front.jobs.hold = True
    waiting = await client.responses.create(model=MODEL, input="later", background=True)
    with pytest.raises(BadRequestError, match="is queued"):
        await client.responses.create(model=MODEL, input="go on", previous_response_id=waiting.id)
    # A foreground response is never "queued", even while its job waits (as OpenAI's).
    before = set(front.jobs.jobs)
    front.jobs.submitted.clear()
    foreground = asyncio.create_task(client.responses.create(model=MODEL, input="now"))
    await front.jobs.submitted.wait()
    [job_id] = set(front.jobs.jobs) - before
    with pytest.raises(BadRequestError, match="is in_progress"):
        await client.responses.create(model=MODEL, input="go on", previous_response_id=f"resp_{job_id}")
    front.jobs.release()
    assert (await foreground).status == "completed"
    # One there is none of (never made, expired, deleted) is OpenAI's 400, which clients that
    # chain take as the sign to send the whole conversation again.
    for missing in ("resp_nope", f"resp_{'0' * 32}"):
        with pytest.raises(BadRequestError) as refused:
            await client.responses.create(model=MODEL, input="go on", previous_response_id=missing)
        body = refused.value.body
        assert (body["code"], body["param"]) == ("previous_response_not_found", "previous_response_id")  # type: ignore[index]
        assert body["message"] == f"Previous response with id '{missing}' not found."  # type: ignore[index]


async def test_a_named_function_call_answered_with_its_output(front: Front) -> None:
    client = openai_of(front)
    stream = await client.responses.create(
        model=MODEL,
        input='{"a": 2}',
        tools=[ADD],
        tool_choice={"type": "function", "name": "add"},
        stream=True,
    )
    events = [event async for event in stream]
    assert "response.function_call_arguments.delta" in [e.type for e in events]
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    # openai 3's event declares no name; the SDK keeps the one the server sent as an extra.
    assert (json.loads(done.arguments), done.name) == ({"a": 2}, "add")  # type: ignore[attr-defined]
    assert events[-1].type == "response.completed"
    response = events[-1].response
    [call] = response.output
    assert call.type == "function_call", call
    assert (call.type, call.name, call.status) == ("function_call", "add", "completed")
    assert call.call_id.startswith("call_") and response.output_text == ""
    assert [t.name for t in response.tools] == ["add"]  # type: ignore[union-attr]
    assert job_request(front, response.id).json_schema == ADD["parameters"]

    answered = await client.responses.create(
        model=MODEL,
        previous_response_id=response.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "four"}],
        tools=[ADD],
    )
    assert answered.output_text == "four"
    asked = job_request(front, answered.id).messages
    assert asked[1].tool_calls is not None and asked[1].tool_calls[0].id == call.call_id
    assert (asked[2].role, asked[2].tool_call_id, asked[2].name) == ("tool", call.call_id, "add")
    assert (
        job_request(front, answered.id).json_schema is None
    )  # tool_choice auto: the template takes the tools


async def test_calls_in_the_text_become_function_call_items(front: Front) -> None:
    client = openai_of(front)
    calling = 'Adding. <tool_call> {"name": "add", "arguments": {"a": 2}} </tool_call>'
    response = await client.responses.create(model=MODEL, input=calling, tools=[ADD])
    assert [item.type for item in response.output] == ["message", "function_call"]
    assert response.output_text == "Adding."  # the blank before the call is no text
    call = response.output[1]
    assert call.type == "function_call"
    assert json.loads(call.arguments) == {"a": 2}
    assert response.output[1].id != response.output[0].id
    # Sent back as input items, the call joins the assistant turn before it.
    items: Any = [
        {"role": "user", "content": "add"},
        *[item.model_dump(exclude_none=True) for item in response.output],
        {"type": "function_call_output", "call_id": call.call_id, "output": "2"},
    ]
    answered = await client.responses.create(model=MODEL, input=items, tools=[ADD])
    asked = job_request(front, answered.id).messages
    assert [m.role for m in asked] == ["user", "assistant", "tool"]
    assert (
        asked[1].content == "Adding."
        and asked[1].tool_calls
        and asked[1].tool_calls[0].function.name == "add"
    )
    # A tool that returned nothing: its empty output is kept, and the response is read back,
    # listed and chained on (its stored record leaves the empty content out).
    items[-1]["output"] = ""
    empty = await client.responses.create(model=MODEL, input=items, tools=[ADD])
    assert (await client.responses.retrieve(empty.id)).id == empty.id
    assert len((await client.responses.input_items.list(empty.id)).data) == len(items)
    chained = await client.responses.create(model=MODEL, input="and then?", previous_response_id=empty.id)
    turns = [(m.role, m.content) for m in job_request(front, chained.id).messages]
    assert turns[2] == ("tool", "") and turns[-1] == ("user", "and then?"), turns


async def test_text_format_json_schema_is_the_jobs_response_format(front: Front) -> None:
    client = openai_of(front)
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    text: Any = {"format": {"type": "json_schema", "name": "number", "schema": schema, "strict": True}}
    response = await client.responses.create(model=MODEL, input='{"n": 1}', text=text)
    assert job_request(front, response.id).json_schema == schema
    assert response.text.format.type == "json_schema"  # type: ignore[union-attr]
    plain = await client.responses.create(model=MODEL, input="x", text={"format": {"type": "json_object"}})
    assert job_request(front, plain.id).json_object is True


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"text": {"verbosity": "low"}}, "text.verbosity"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"background": True, "store": False}, "store"),
        ({"temperature": 3}, "temperature"),
        ({"tool_choice": {"type": "web_search"}}, "tool_choice"),
        ({"tools": [ADD], "tool_choice": {"type": "function", "name": "sub"}}, "tool_choice"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input"),
        ({"conversation": "conv_1"}, "conversation"),
        (
            {
                "input": [
                    {"role": "user", "content": "a", "id": "m1"},
                    {"role": "user", "content": "b", "id": "m1"},
                ]
            },
            "input",
        ),
        ({"stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation"),
        (
            {"text": {"format": {"type": "json_schema", "name": "s", "schema": {"not": {}}}}},
            "text.format",
        ),
        ({"tools": [{**ADD, "parameters": {"$ref": "#/$defs/none"}}], "tool_choice": "required"}, "tools.0"),
        ({"tools": [{**ADD, "parameters": {"type": "array"}}]}, "tools.0.parameters"),
        ({"input": [{"role": "user", "content": [{"type": "output_text", "text": "x"}]}]}, "input.0"),
        # Every member of a union complains of type: the member that took the list says where.
        ({"input": [{"role": "user", "content": None}]}, "input.0.content"),
        ({"stream": "yes"}, "stream"),  # JSON's true or false only, as OpenAI takes them (was: a stream)
        ({"background": "true"}, "background"),
        ({"store": 0}, "store"),
    ],
)
async def test_what_cannot_be_honoured_is_a_400_naming_the_field(
    front: Front, body: dict[str, Any], param: str
) -> None:
    response = await front.http.post("/v1/responses", json={"model": MODEL, "input": "hi", **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"].startswith(param), response.json()
    assert not front.jobs.jobs  # nothing was created


async def test_limits_and_query_refusals_name_the_responses_field(limited: Front) -> None:
    over = await limited.http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 100})
    assert (over.status_code, over.json()["error"]["param"]) == (400, "max_output_tokens")
    done = (await limited.http.post("/v1/responses", json={"input": "hi"})).json()
    queries: list[tuple[dict[str, str | int], str]] = [
        ({"starting_after": 2}, "starting_after"),
        ({"include": "file_search_call.results"}, "include"),
        ({"stream": "true", "starting_after": -1}, "starting_after"),
    ]
    for query, param in queries:
        refused = await limited.http.get(f"/v1/responses/{done['id']}", params=query)
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, param)


async def test_another_keys_response_is_not_found(keyed: Front) -> None:
    http = keyed.http
    a, b = {"Authorization": f"Bearer {KEY_A}"}, {"Authorization": f"Bearer {KEY_B}"}
    created = await http.post("/v1/responses", json={"input": "mine", "background": True}, headers=a)
    rid = created.json()["id"]
    assert (await http.get(f"/v1/responses/{rid}", headers=a)).status_code == 200
    for method, path in (
        ("GET", f"/v1/responses/{rid}"),
        ("GET", f"/v1/responses/{rid}/input_items"),
        ("POST", f"/v1/responses/{rid}/cancel"),
        ("DELETE", f"/v1/responses/{rid}"),
    ):
        response = await http.request(method, path, headers=b)
        assert (response.status_code, response.json()["error"]["code"]) == (404, "response_not_found")
    chained = await http.post("/v1/responses", json={"input": "x", "previous_response_id": rid}, headers=b)
    refused = chained.json()["error"]
    assert (chained.status_code, refused["param"], refused["code"]) == (
        400,
        "previous_response_id",
        "previous_response_not_found",
    )  # as OpenAI answers one it has none of
    assert (await http.get(f"/v1/responses/{rid}", headers=a)).json()["status"] == "completed"
