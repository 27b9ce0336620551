"""OpenAI's fields through the official SDK over the in-memory job system: tool calls (read from
the answer's text), logprobs in both shapes, echo, raw prompts, and refusals that name the field.
The fake model answers the last message (or raw prompt) back, one word per token."""

from __future__ import annotations

import json

import pytest
from openai import AsyncOpenAI, BadRequestError

from tests.fast.conftest import Front
from tests.fast.test_front_formats import _openai

pytestmark = pytest.mark.anyio

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
        },
    }
]
CALLING = 'Adding. <tool_call> {"name": "add", "arguments": {"a": 2}} </tool_call>'


async def test_a_hermes_call_in_the_answer_is_a_tool_call(front: Front) -> None:
    client: AsyncOpenAI = _openai(front)
    ask = [{"role": "user", "content": CALLING}]
    whole = await client.chat.completions.create(model="fake-model", messages=ask, tools=TOOLS)  # type: ignore[arg-type]
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Adding."
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert (call.function.name, json.loads(call.function.arguments)) == ("add", {"a": 2})  # type: ignore[union-attr]

    stream = await client.chat.completions.create(model="fake-model", messages=ask, tools=TOOLS, stream=True)  # type: ignore[arg-type]
    chunks = [c async for c in stream]
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [t.function.name for t in calls] == ["add"]  # type: ignore[union-attr]
    assert (
        calls[0].id
        and calls[0].id.startswith("call_")
        and calls[0].function.arguments == call.function.arguments
    )  # type: ignore[union-attr]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    plain = await client.chat.completions.create(
        model="fake-model", messages=ask, tools=TOOLS, tool_choice="none"
    )  # type: ignore[arg-type]
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in (
        plain.choices[0].message.content or ""
    )


async def test_chat_logprobs_match_the_answer_streamed_and_not(front: Front) -> None:
    client = _openai(front)
    ask = [{"role": "user", "content": "one two three"}]
    whole = await client.chat.completions.create(
        model="fake-model", messages=ask, logprobs=True, top_logprobs=2
    )  # type: ignore[arg-type]
    content = whole.choices[0].logprobs.content  # type: ignore[union-attr]
    assert "".join(bytes(e.bytes or []).decode() for e in content) == whole.choices[0].message.content  # type: ignore[union-attr]
    assert all(len(e.top_logprobs) == 2 for e in content)  # type: ignore[union-attr]
    stream = await client.chat.completions.create(
        model="fake-model", messages=ask, logprobs=True, stream=True
    )  # type: ignore[arg-type]
    entries = [
        e
        for c in [c async for c in stream]
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    assert [e.token for e in entries] == [e.token for e in content]  # type: ignore[union-attr]
    none = await client.chat.completions.create(model="fake-model", messages=ask)  # type: ignore[arg-type]
    assert none.choices[0].logprobs is None


async def test_echo_with_logprobs_gives_the_prompts_tokens_first(front: Front) -> None:
    client = _openai(front)
    done = await client.completions.create(
        model="fake-model", prompt=[[7, 8, 9]], max_tokens=1, echo=True, logprobs=1
    )
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert logprobs.tokens == ["t7", " t8", " t9", "t7"]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.text_offset == [0, 2, 5, 8]
    assert done.choices[0].text == "t7 t8 t9t7"
    echoed = await client.completions.create(model="fake-model", prompt="say it", echo=True)
    assert echoed.choices[0].text == "say itsay it" and echoed.choices[0].logprobs is None


async def test_fields_streamq_cannot_honour_are_refused_by_name(front: Front) -> None:
    client = _openai(front)
    ask = [{"role": "user", "content": "hi"}]
    for extra, param in (
        ({"min_p": 0.1}, "min_p"),
        ({"store": True}, "store"),
        ({"modalities": ["audio"]}, "modalities.0"),
    ):
        with pytest.raises(BadRequestError) as refused:
            await client.chat.completions.create(model="fake-model", messages=ask, extra_body=extra)  # type: ignore[arg-type]
        assert refused.value.status_code == 400
        assert isinstance(refused.value.body, dict) and refused.value.body.get("param") == param, (
            refused.value.body
        )
    with pytest.raises(BadRequestError) as refused:
        await client.completions.create(model="fake-model", prompt="x", suffix="after")
    assert isinstance(refused.value.body, dict) and refused.value.body.get("param") == "suffix"
