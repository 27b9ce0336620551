"""Tools beside a JSON format (OpenAI serves the two together: the model calls a tool, or answers
in the format), through the clients people use, on the transformers engine with the tiny random
model; and the deepest request body the front takes, run to its end by a worker."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Stack
from tests.openai_asks import Weather, ask

pytestmark = pytest.mark.e2e


class Mood(BaseModel):
    name: str = Field(max_length=8)
    mood: str = Field(pattern="^(glad|calm|tired)$")


def test_tools_beside_a_json_format_answer_with_a_call_or_the_json(
    client: openai.OpenAI, stack: Stack
) -> None:
    """Tools and a JSON format together (OpenAI serves both: the model calls a tool, or answers
    in the format), through the SDK's parse helper and LangChain's bind_tools with a
    response_format: every sampled answer is a call to the tool or the JSON, each parsed."""
    from langchain_openai import ChatOpenAI

    for seed in range(4):
        completion = client.chat.completions.parse(
            **ask(stack, "Weather or mood?", max_tokens=150),
            tools=[openai.pydantic_function_tool(Weather)],
            parallel_tool_calls=False,
            response_format=Mood,
            temperature=1.0,
            seed=seed,
        )
        message = completion.choices[0].message
        if message.tool_calls:
            assert completion.choices[0].finish_reason == "tool_calls" and message.content is None
            assert isinstance(message.tool_calls[0].function.parsed_arguments, Weather)
        else:
            assert isinstance(message.parsed, Mood), message
    llm = ChatOpenAI(
        model=stack.model_dir.name, base_url=stack.url + "/v1", api_key="x", max_tokens=150, max_retries=0
    )
    bound = llm.bind_tools([Weather], strict=True, parallel_tool_calls=False, response_format=Mood)
    reply = bound.invoke("Weather or mood?")
    if reply.tool_calls:
        Weather.model_validate(reply.tool_calls[0]["args"])
    else:
        assert isinstance(reply.additional_kwargs["parsed"], Mood), reply


def test_the_deepest_json_the_front_takes_runs_on_a_worker(client: openai.OpenAI, stack: Stack) -> None:
    """A tool's parameters 200 deep were taken, then the worker could not read its job back
    (RQ failed it as lost: a 502). The front now refuses bodies nested past 160 levels, and the
    deepest it takes runs: the worker reads the job, in its grammar's form too (a JSON format
    beside the tools puts the schemas a few levels deeper)."""
    node: dict[str, Any] = {}
    for _ in range(160 - 6):  # the body's own levels above the parameters' "x": 6
        node = {"a": node}
    parameters = {"type": "object", "x": node}
    tool: Any = {"type": "function", "function": {"name": "f", "parameters": parameters, "strict": True}}
    answer = client.chat.completions.create(
        **ask(stack, "hi", max_tokens=2), tools=[tool], response_format={"type": "json_object"}
    )
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls"), answer
    deeper: Any = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "x": [node]}},
    }
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask(stack, "hi", max_tokens=2), tools=[deeper])
    assert refused.value.body["code"] == "too_deep"  # type: ignore[index]
