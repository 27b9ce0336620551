"""A conversation's tool results must answer its calls, on the chat route and on Responses, as
OpenAI checks them: a result that answers no call, or a call left without its result, is a 400
(before a job exists), and a conversation that follows the rule is taken. Through the official
SDK over the in-memory job system; the fake model answers the last message back."""

from __future__ import annotations

from typing import Any

import pytest
from openai import BadRequestError

from shared.schemas import JobError
from tests.fast.conftest import Front, openai_of
from tests.fast.responses_calls import ADD, MODEL, job_request

pytestmark = pytest.mark.anyio


def _calling(*ids: str) -> dict[str, Any]:
    calls = [{"id": i, "type": "function", "function": {"name": "add", "arguments": "{}"}} for i in ids]
    return {"role": "assistant", "content": None, "tool_calls": calls}


def _result(call_id: str) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": call_id, "content": "4"}


USER = {"role": "user", "content": "add"}


@pytest.mark.parametrize(
    ("messages", "param", "says"),
    [
        ([USER, _result("nope")], "messages.1.role", "must answer a call"),
        ([USER, _calling("a"), _result("nope")], "messages.2.tool_call_id", "'nope' is not the id"),
        ([USER, _calling("a", "b"), _result("a"), USER], "messages.1.tool_calls", "no answer to: b"),
        ([USER, _calling("a", "b"), _result("b")], "messages.1.tool_calls", "no answer to: a"),
        ([USER, _calling("a"), USER, _result("a")], "messages.1.tool_calls", "no answer to: a"),
    ],
)
async def test_chat_refuses_tool_results_that_do_not_answer_the_calls(
    front: Front, messages: list[dict[str, Any]], param: str, says: str
) -> None:
    with pytest.raises(BadRequestError) as refused:
        await openai_of(front).chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
    body: Any = refused.value.body
    assert body["param"] == param and says in body["message"], body
    assert not front.jobs.jobs  # refused before any job was made


async def test_chat_takes_every_call_answered_in_any_order(front: Front) -> None:
    messages: Any = [USER, _calling("a", "b"), _result("b"), _result("a"), USER, _calling("c"), _result("c")]
    answer = await openai_of(front).chat.completions.create(model=MODEL, messages=messages)
    assert answer.choices[0].message.content == "4"


async def test_responses_refuse_outputs_that_answer_no_call_and_calls_left_unanswered(front: Front) -> None:
    client = openai_of(front)
    forced = await client.responses.create(
        model=MODEL, input='{"a": 2}', tools=[ADD], tool_choice={"type": "function", "name": "add"}
    )
    [call] = forced.output
    assert call.type == "function_call"
    bogus: Any = [{"type": "function_call_output", "call_id": "call_bogus", "output": "4"}]
    for previous, given, says in (
        (forced.id, bogus, "No tool call found for function call output with call_id call_bogus."),
        (None, bogus, "No tool call found for function call output with call_id call_bogus."),
        (forced.id, "go on", f"No tool output found for function call {call.call_id}."),
    ):
        with pytest.raises(BadRequestError) as refused:
            await client.responses.create(
                model=MODEL, previous_response_id=previous, input=given, tools=[ADD]
            )
        body: Any = refused.value.body
        assert (body["param"], body["message"]) == ("input", says), body
    answered: Any = [{"type": "function_call_output", "call_id": call.call_id, "output": "four"}]
    taken = await client.responses.create(
        model=MODEL, previous_response_id=forced.id, input=answered, tools=[ADD]
    )
    assert taken.output_text == "four"


async def test_responses_pair_outputs_with_calls_by_id_wherever_they_sit(front: Front) -> None:
    """OpenAI's manual loop (``input += response.output``, then the outputs) with text after the
    call, and a user message between a call and its output: taken, each output rendered right
    after its call's turn, the assistant's items as one turn."""
    client = openai_of(front)
    calling = 'Adding. <tool_call> {"name": "add", "arguments": {"a": 2}} </tool_call> Done.'
    first = await client.responses.create(model=MODEL, input=calling, tools=[ADD])
    assert [item.type for item in first.output] == ["message", "function_call", "message"]
    call = first.output[1]
    assert call.type == "function_call"
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "4"}
    items: Any = [
        {"role": "user", "content": "add"},
        *[item.model_dump(exclude_none=True) for item in first.output],
        {"role": "user", "content": "and say it"},
        output,
    ]
    answered = await client.responses.create(model=MODEL, input=items, tools=[ADD])
    asked = job_request(front, answered.id).messages
    assert [m.role for m in asked] == ["user", "assistant", "tool", "user"]
    assert asked[1].content == "Adding.  Done." and asked[1].tool_calls
    assert asked[2].tool_call_id == call.call_id
    assert answered.output_text == "and say it"

    # Two texts of the assistant in a row (two message items) are a line apart in its one turn.
    said: Any = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "assistant", "content": [{"type": "output_text", "text": "How are you?"}]},
        {"role": "user", "content": "fine"},
    ]
    replied = await client.responses.create(model=MODEL, input=said)
    assert [(m.role, m.content) for m in job_request(front, replied.id).messages] == [
        ("user", "Hi"),
        ("assistant", "Hello.\nHow are you?"),
        ("user", "fine"),
    ]


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0", "not supported"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input.0.content.0", "image"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role", "should be 'user'"),
        ({"input": [{"type": "function_call_output", "output": "4"}]}, "input.0.call_id", "required"),
        ({"max_output_tokens": 100}, "max_output_tokens", "'max_output_tokens' must be at most 16"),
        (
            {"text": {"format": {"type": "json_schema", "name": "my format!", "schema": {"type": "object"}}}},
            "text.format.name",
            "should match pattern",
        ),
    ],
)
async def test_a_responses_400_names_the_field_as_sent_and_in_its_words(
    limited: Front, body: dict[str, Any], param: str, says: str
) -> None:
    """No union member's tag in the place (input.0.content, not input.0.message.content), and
    the message names the Responses field, not the job request's."""
    response = await limited.http.post("/v1/responses", json={"input": "hi", **body})
    error = response.json()["error"]
    assert (response.status_code, error["param"]) == (400, param), error
    assert says in error["message"], error


async def test_a_response_whose_job_is_refused_by_its_worker_is_a_400_unless_in_the_background(
    front: Front,
) -> None:
    """A schema only the worker's compiler refuses: the response waited for is a 400 naming the
    Responses field (tools for a forced call), a background one ends failed with the same error,
    a streamed one ends with an error event; a generation error stays a failed response."""
    client = openai_of(front)
    front.jobs.fail_with = JobError(
        type="invalid_request_error", message="response_format: cannot be compiled", param="response_format"
    )
    forced: dict[str, Any] = {"tools": [ADD], "tool_choice": "required"}
    for fields, param in (({}, "text.format"), (forced, "tools")):
        with pytest.raises(BadRequestError) as refused:
            await client.responses.create(model=MODEL, input="x", **fields)
        body: Any = refused.value.body
        assert (body["param"], body["message"]) == (param, f"{param}: cannot be compiled"), body
        assert refused.value.response.headers["x-streamq-job-id"]
    background = await client.responses.create(model=MODEL, input="x", background=True)
    polled = await client.responses.retrieve(background.id)
    assert polled.status == "failed" and polled.error is not None
    assert polled.error.message == "text.format: cannot be compiled"
    events = [e async for e in await client.responses.create(model=MODEL, input="x", stream=True)]
    assert [e.type for e in events[-2:]] == ["error", "response.failed"]
    front.jobs.fail_with = JobError(type="generation_error", message="the engine stopped")
    failed = await client.responses.create(model=MODEL, input="x")
    assert failed.status == "failed" and failed.error is not None


async def test_a_call_sent_again_with_the_previous_response_is_kept_once(front: Front) -> None:
    """An input that sends back the previous response's call beside its output: the stored
    conversation, which later turns continue, holds the call once (the earlier turns given to
    the request were extended in place, and the record, made from them again, held it twice)."""
    client = openai_of(front)
    forced = await client.responses.create(
        model=MODEL, input='{"a": 2}', tools=[ADD], tool_choice={"type": "function", "name": "add"}
    )
    [call] = forced.output
    assert call.type == "function_call"
    again: Any = [
        call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "4"},
    ]
    second = await client.responses.create(
        model=MODEL, previous_response_id=forced.id, input=again, tools=[ADD]
    )
    third = await client.responses.create(model=MODEL, previous_response_id=second.id, input="thanks")
    asked = job_request(front, third.id).messages
    assert [m.role for m in asked] == ["user", "assistant", "tool", "assistant", "user"]
    assert [c.id for c in asked[1].tool_calls or []] == [call.call_id]
