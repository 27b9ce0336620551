"""OpenAI's fields through the official SDK over the in-memory job system: tool calls (read from
the answer's text), logprobs in both shapes, echo, raw prompts, and refusals that name the field.
The fake model answers the last message (or raw prompt) back, one word per token."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import AsyncOpenAI, BadRequestError
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam
from pydantic import BaseModel

from tests.fast.conftest import Front, openai_of

pytestmark = pytest.mark.anyio

TOOLS: list[ChatCompletionToolParam] = [
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
    client: AsyncOpenAI = openai_of(front)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": CALLING}]
    whole = await client.chat.completions.create(model="fake-model", messages=ask, tools=TOOLS)
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Adding."
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert (call.function.name, json.loads(call.function.arguments)) == ("add", {"a": 2})

    stream = await client.chat.completions.create(model="fake-model", messages=ask, tools=TOOLS, stream=True)
    chunks = [c async for c in stream]
    calls = [t for c in chunks for t in c.choices[0].delta.tool_calls or []]
    assert [t.function.name if t.function else None for t in calls] == ["add"]
    assert calls[0].function is not None
    assert (
        calls[0].id
        and calls[0].id.startswith("call_")
        and calls[0].function.arguments == call.function.arguments
    )
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    plain = await client.chat.completions.create(
        model="fake-model", messages=ask, tools=TOOLS, tool_choice="none"
    )
    assert plain.choices[0].message.tool_calls is None and "<tool_call>" in (
        plain.choices[0].message.content or ""
    )


async def test_a_forced_call_streamed_has_no_content_as_the_whole_answer(front: Front) -> None:
    """The SDK's stream helper built ``content: ""`` from the opening chunk, where the answer not
    streamed (and OpenAI's stream) has none."""
    client: AsyncOpenAI = openai_of(front)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": '{"a": 2}'}]
    named: Any = {"type": "function", "function": {"name": "add"}}
    whole = await client.chat.completions.create(
        model="fake-model", messages=ask, tools=TOOLS, tool_choice=named
    )
    async with client.chat.completions.stream(
        model="fake-model", messages=ask, tools=TOOLS, tool_choice=named
    ) as stream:
        events = [event.type async for event in stream]
        streamed = await stream.get_final_completion()
    assert "content.delta" not in events
    for message in (whole.choices[0].message, streamed.choices[0].message):
        assert message.content is None and message.tool_calls is not None
        assert [c.function.name for c in message.tool_calls] == ["add"]  # type: ignore[union-attr]


async def test_strict_functions_with_auto_give_the_job_the_calls_grammar(front: Front) -> None:
    client: AsyncOpenAI = openai_of(front)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    strict: Any = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}]
    for tools, held in ((TOOLS, False), (strict, True)):
        await client.chat.completions.create(model="fake-model", messages=ask, tools=tools)
        asked = [job.request for job in front.jobs.jobs.values()][-1]
        assert (asked.structural_tag is not None) is held
    tag = asked.structural_tag
    assert tag is not None and tag["format"]["triggers"] == ["<tool_call>"]
    assert tag["format"]["tags"][0]["content"]["json_schema"] == TOOLS[0]["function"]["parameters"]
    unholdable: Any = [
        {**strict[0], "function": {**strict[0]["function"], "parameters": {"type": "object", "not": {}}}}
    ]
    with pytest.raises(BadRequestError) as refused:
        await client.chat.completions.create(model="fake-model", messages=ask, tools=unholdable)
    assert refused.value.body["param"] == "tools.0.function.parameters"  # type: ignore[index]


async def test_tools_beside_a_json_format_give_the_job_calls_or_the_json(front: Front) -> None:
    """Tools with a JSON ``response_format`` (LangChain's agent with a provider-side structured
    response sends both): the job's grammar is calls or that JSON, and the answer is read as
    either; a forced call is the call's JSON alone, and the job API takes the pair the same way."""
    client = openai_of(front)

    class Sum(BaseModel):
        total: int

    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": '{"total": 3}'}]
    strict: Any = [{**TOOLS[0], "function": {**TOOLS[0]["function"], "strict": True}}]
    parsed = await client.chat.completions.parse(
        model="fake-model", messages=ask, tools=strict, response_format=Sum
    )
    assert parsed.choices[0].message.parsed == Sum(total=3)
    asked = [job.request for job in front.jobs.jobs.values()][-1]
    assert asked.json_schema is None and asked.structural_tag is not None
    answer_schema = asked.json_or_calls()
    assert answer_schema is not None and answer_schema["properties"] == {
        "total": {"title": "Total", "type": "integer"}
    }
    assert [t["begin"] for t in asked.structural_tag["format"]["elements"][1]["tags"]] == [
        '<tool_call>{"name": "add", "arguments": '
    ]
    calling: list[ChatCompletionMessageParam] = [{"role": "user", "content": CALLING}]
    called = await client.chat.completions.create(
        model="fake-model", messages=calling, tools=TOOLS, response_format={"type": "json_object"}
    )
    assert called.choices[0].finish_reason == "tool_calls"
    assert [c.function.name for c in called.choices[0].message.tool_calls or []] == ["add"]  # type: ignore[union-attr]
    assert [job.request for job in front.jobs.jobs.values()][-1].json_or_calls() == {"type": "object"}

    forced = await client.chat.completions.create(
        model="fake-model",
        messages=[{"role": "user", "content": '{"a": 2}'}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}},
        response_format={"type": "json_object"},
    )
    assert [c.function.name for c in forced.choices[0].message.tool_calls or []] == ["add"]  # type: ignore[union-attr]
    asked = [job.request for job in front.jobs.jobs.values()][-1]
    assert asked.structural_tag is None and asked.json_schema == TOOLS[0]["function"]["parameters"]

    # Any: the SDK's FunctionToolParam requires a "strict" key, which this request leaves out.
    function: Any = {"type": "function", "name": "add", "parameters": TOOLS[0]["function"]["parameters"]}
    answered = await client.responses.create(
        model="fake-model",
        input='{"total": 3}',
        tools=[function],
        text={"format": {"type": "json_schema", "name": "sum", "schema": Sum.model_json_schema()}},
    )
    assert json.loads(answered.output_text) == {"total": 3}
    assert [job.request for job in front.jobs.jobs.values()][-1].json_or_calls() is not None

    job = await front.http.post(
        "/v1/jobs",
        json={
            "messages": ask,
            "tools": TOOLS,
            "response_format": {"type": "json_object"},
            "model": "fake-model",
        },
    )
    assert job.status_code == 202, job.text
    assert front.jobs.jobs[job.json()["id"]].request.json_or_calls() == {"type": "object"}


async def test_chat_logprobs_match_the_answer_streamed_and_not(front: Front) -> None:
    client = openai_of(front)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three"}]
    whole = await client.chat.completions.create(
        model="fake-model", messages=ask, logprobs=True, top_logprobs=2
    )
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    content = logprobs.content
    assert "".join(bytes(e.bytes or []).decode() for e in content) == whole.choices[0].message.content
    assert all(len(e.top_logprobs) == 2 for e in content)
    stream = await client.chat.completions.create(
        model="fake-model", messages=ask, logprobs=True, stream=True
    )
    entries = [
        e
        for c in [c async for c in stream]
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content or []
    ]
    assert [e.token for e in entries] == [e.token for e in content]
    none = await client.chat.completions.create(model="fake-model", messages=ask)
    assert none.choices[0].logprobs is None


async def test_echo_with_logprobs_gives_the_prompts_tokens_first(front: Front) -> None:
    client = openai_of(front)
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


async def test_a_completion_without_max_tokens_is_16_tokens_as_openai_and_vllm_answer_it(
    front: Front,
) -> None:
    client = openai_of(front)
    words = " ".join(f"w{i}" for i in range(20))
    done = await client.completions.create(model="fake-model", prompt=words)
    assert done.choices[0].text == " ".join(words.split()[:16]) and done.choices[0].finish_reason == "length"
    assert done.usage is not None and done.usage.completion_tokens == 16
    longer = await client.completions.create(model="fake-model", prompt=words, max_tokens=40)
    assert longer.choices[0].text == words and longer.choices[0].finish_reason == "stop"
    chat = await client.chat.completions.create(
        model="fake-model", messages=[{"role": "user", "content": words}]
    )
    assert chat.choices[0].message.content == words  # the chat route keeps the server's default


async def test_parallel_tool_calls_without_tools_is_refused_as_openai_refuses_it(front: Front) -> None:
    client = openai_of(front)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    with pytest.raises(BadRequestError) as refused:
        await client.chat.completions.create(model="fake-model", messages=ask, parallel_tool_calls=False)
    body = refused.value.body
    assert isinstance(body, dict) and body.get("param") == "parallel_tool_calls", body
    assert "only allowed when 'tools' are specified" in str(body.get("message"))
    done = await client.chat.completions.create(
        model="fake-model", messages=ask, tools=TOOLS, parallel_tool_calls=False
    )
    assert done.choices[0].message.content == "hi"


async def test_fields_streamq_cannot_honour_are_refused_by_name(front: Front) -> None:
    client = openai_of(front)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    for extra, param in (
        ({"min_p": 0.1}, "min_p"),
        ({"store": True}, "store"),
        ({"modalities": ["audio"]}, "modalities.0"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
            "response_format.json_schema.name",
        ),
    ):
        with pytest.raises(BadRequestError) as refused:
            await client.chat.completions.create(model="fake-model", messages=ask, extra_body=extra)
        assert refused.value.status_code == 400
        assert isinstance(refused.value.body, dict) and refused.value.body.get("param") == param, (
            refused.value.body
        )
    with pytest.raises(BadRequestError) as refused:
        await client.completions.create(model="fake-model", prompt="x", suffix="after")
    assert isinstance(refused.value.body, dict) and refused.value.body.get("param") == "suffix"


async def test_metadata_over_openais_limits_is_refused_on_every_route(front: Front) -> None:
    """16 pairs, keys of 64 characters, values of 512 (as OpenAI): within them it is taken."""
    client = openai_of(front)
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]
    for metadata in ({str(i): "v" for i in range(17)}, {"k" * 65: "v"}, {"k": "v" * 513}):
        with pytest.raises(BadRequestError) as chat:
            await client.chat.completions.create(model="fake-model", messages=ask, metadata=metadata)
        with pytest.raises(BadRequestError) as text:
            await client.completions.create(model="fake-model", prompt="x", extra_body={"metadata": metadata})
        with pytest.raises(BadRequestError) as response:
            await client.responses.create(model="fake-model", input="hi", metadata=metadata)
        for refused in (chat, text, response):
            assert isinstance(refused.value.body, dict) and refused.value.body.get("param") == "metadata"
    widest = {f"{i:064d}": "v" * 512 for i in range(16)}
    answer = await client.chat.completions.create(model="fake-model", messages=ask, metadata=widest)
    assert answer.choices[0].message.content == "hi"


async def test_a_pattern_that_repeats_too_much_is_refused_before_a_job_exists(front: Front) -> None:
    """``^a{24000}$`` would hold a worker's slot for the grammar's compile (45 s here): a 400
    naming the field, in a JSON format and in a strict function's parameters alike."""
    client = openai_of(front)
    jobs_before = len(front.jobs.jobs)
    bomb: dict[str, object] = {
        "type": "object",
        "properties": {"a": {"type": "string", "pattern": "^a{24000}$"}},
    }
    ask: list[ChatCompletionMessageParam] = [{"role": "user", "content": "x"}]
    with pytest.raises(BadRequestError) as refused:
        await client.chat.completions.create(
            model="fake-model",
            messages=ask,
            response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": bomb}},
        )
    assert refused.value.param == "response_format.json_schema.schema"
    assert "repeats too much" in refused.value.message
    strict: Any = [{"type": "function", "function": {"name": "f", "parameters": bomb, "strict": True}}]
    with pytest.raises(BadRequestError) as refused:
        await client.chat.completions.create(model="fake-model", messages=ask, tools=strict)
    assert (
        refused.value.param == "tools.0.function.parameters" and "repeats too much" in refused.value.message
    )
    assert len(front.jobs.jobs) == jobs_before
