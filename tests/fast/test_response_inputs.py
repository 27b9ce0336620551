"""What a Responses request may bring back over the in-memory job system: a call and tools as the
openai SDK dumps them, and a chain longer than one request's limits."""

from __future__ import annotations

from typing import Any

import pytest
from openai import BadRequestError
from openai.types.responses import EasyInputMessageParam

from api.auth import ApiKeys
from tests.fast.conftest import Front, _settings, open_front, openai_of
from tests.fast.responses_calls import ADD, MODEL, job_request

pytestmark = pytest.mark.anyio


async def test_a_call_and_tools_sent_back_as_the_sdk_dumps_them_are_taken(front: Front) -> None:
    """Apps keep a conversation as JSON: ``model_dump()`` of the call and of the response's tools
    writes OpenAI's fields that ask for nothing (``"async": null``, ``"defer_loading": null``);
    those are taken, and a value that asks for something is still refused, naming it."""
    client = openai_of(front)
    forced = await client.responses.create(
        model=MODEL, input='{"a": 2}', tools=[ADD], tool_choice={"type": "function", "name": "add"}
    )
    [call] = forced.output
    tools: list[Any] = [tool.model_dump() for tool in forced.tools]  # dicts, as apps keep them
    for dumped in (call.model_dump(), call.model_dump(by_alias=True), call.model_dump(mode="json")):
        history: list[Any] = [{"role": "user", "content": '{"a": 2}'}, dumped]
        output: Any = {"type": "function_call_output", "call_id": call.call_id, "output": "four"}  # type: ignore[union-attr]
        answered = await client.responses.create(model=MODEL, input=[*history, output], tools=tools)
        assert answered.output_text == "four"
        asked = job_request(front, answered.id).messages
        assert asked[1].tool_calls is not None and asked[1].tool_calls[0].function.arguments == call.arguments  # type: ignore[union-attr]
    asking: Any = {**call.model_dump(by_alias=True), "async": True}
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "four"}  # type: ignore[union-attr]
    with pytest.raises(BadRequestError) as refused:
        await client.responses.create(model=MODEL, input=[asking, output], tools=tools)
    assert refused.value.body["param"] == "input.0.async"  # type: ignore[index]


async def test_a_chain_is_bounded_by_the_context_not_by_the_limits_of_one_request() -> None:
    """The limits of messages and characters are a request's: a chain's earlier turns, checked
    when they were sent, do not count again (a conversation of 256 messages broke at turn 128)."""
    settings = _settings(max_messages=4, max_prompt_chars=120)
    async for front in open_front(settings, ApiKeys([])):
        client = openai_of(front)
        previous: str | None = None
        for turn in range(6):  # 12 messages and about 300 characters by the end
            response = await client.responses.create(
                model=MODEL, input=f"turn {turn} of a long conversation", previous_response_id=previous
            )
            previous = response.id
        assert previous is not None
        assert len(job_request(front, previous).messages) == 11  # the chain whole: 5 turns and the input
        question: EasyInputMessageParam = {"role": "user", "content": "q"}
        with pytest.raises(BadRequestError) as refused:
            await client.responses.create(model=MODEL, input=[*[question] * 5])
        assert refused.value.body["param"] == "input"  # type: ignore[index]
        with pytest.raises(BadRequestError) as refused:
            await client.responses.create(model=MODEL, input="x" * 121, previous_response_id=previous)
        assert refused.value.body["param"] == "input"  # type: ignore[index]


async def test_listed_input_items_sent_back_as_the_sdk_dumps_them_are_taken(front: Front) -> None:
    """``input_items.list`` and ``model_dump()`` of each item write ``"prompt_cache_breakpoint":
    null`` on a text part, and a call's output its ``caller``, ``name`` and ``namespace``
    (null, or the function's name): taken, the name naming the tool turn; a cache breakpoint or
    a caller that asks for something is refused, naming it."""
    client = openai_of(front)
    forced = await client.responses.create(
        model=MODEL, input='{"a": 2}', tools=[ADD], tool_choice={"type": "function", "name": "add"}
    )
    [call] = forced.output
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "four", "name": "add"}  # type: ignore[union-attr]
    sent: list[Any] = [{"role": "user", "content": '{"a": 2}'}, call.model_dump(), output]  # dicts, as dumped
    first = await client.responses.create(model=MODEL, input=sent)
    listed = (await client.responses.input_items.list(first.id, order="asc")).data
    dumped: list[Any] = [item.model_dump() for item in listed]
    assert "prompt_cache_breakpoint" in dumped[0]["content"][0] and dumped[2]["name"] == "add"
    again = await client.responses.create(model=MODEL, input=dumped)
    assert again.output_text == "four"
    assert [(m.role, m.name) for m in job_request(front, again.id).messages] == [
        ("user", None),
        ("assistant", None),
        ("tool", "add"),
    ]
    breakpoint_given = {"type": "input_text", "text": "hi", "prompt_cache_breakpoint": {"ttl": "5m"}}
    caller_given = {**output, "caller": {"type": "direct"}}
    for item, param in (
        ({"role": "user", "content": [breakpoint_given]}, "input.0.content.0.prompt_cache_breakpoint"),
        (caller_given, "input.1.caller"),
    ):
        sent = [call.model_dump(), item] if param.startswith("input.1") else [item]
        with pytest.raises(BadRequestError) as refused:
            await client.responses.create(model=MODEL, input=sent)
        assert refused.value.body["param"] == param  # type: ignore[index]
