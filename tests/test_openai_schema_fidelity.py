"""Schemas the answer is held to, through the official SDK against the real stack (tiny random
model): a schema the grammar would not hold is a 400 naming its field before any job exists,
one only the worker finds unusable names its field too (whole and streamed), a forced call
to a function with nested models follows them, and a forced call the length cuts is a call.
tests/test_json_schema_check.py checks the rules themselves against xgrammar."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Stack
from tests.openai_asks import WEATHER, ask

pytestmark = pytest.mark.e2e


def test_a_required_call_cut_by_max_tokens_is_a_call_with_the_arguments_it_got(
    client: openai.OpenAI, stack: Stack
) -> None:
    """As OpenAI answers a call the length cut: the call, its arguments as far as they came,
    finish_reason length; never the guided JSON as content."""
    for stream in (False, True):
        request = ask(stack, "Weather?", max_tokens=44)  # the tiny model's tokens: about a character each
        request |= {"tools": [WEATHER], "tool_choice": "required", "temperature": 0.0}
        if stream:
            chunks = list(client.chat.completions.create(**request, stream=True))
            parts = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or []]
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
            name, arguments = parts[0].function.name, "".join(p.function.arguments or "" for p in parts)
        else:
            whole = client.chat.completions.create(**request)
            content, finish = whole.choices[0].message.content or "", [whole.choices[0].finish_reason]
            call = whole.choices[0].message.tool_calls[0]
            name, arguments = call.function.name, call.function.arguments
        assert finish == ["length"] and content == "", (content, finish)
        assert name == "get_weather" and arguments.startswith('{"city"'), arguments
        with pytest.raises(json.JSONDecodeError):  # cut: as far as the arguments came
            json.loads(arguments)


@pytest.mark.parametrize(
    ("field", "param"),
    [
        ("response_format", "response_format.json_schema.schema"),
        ("tools", "tools.0.function.parameters"),
    ],
)
@pytest.mark.parametrize(
    ("schema", "says"),
    [
        (
            {"type": "object", "properties": {"a": {"$ref": "#/$defs/nothing"}}},
            "'#/$defs/nothing' points at nothing in the schema (at #/properties/a)",
        ),
        ({"$ref": "https://example.com/person.json"}, "points outside the schema"),
        ({"type": "object", "properties": {"a": {"type": "integer", "not": {"const": 1}}}}, "'not' is not"),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "'allOf' of 2 schemas is not enforced"),
    ],
)
def test_a_schema_no_answer_can_follow_is_a_400_naming_it_and_makes_no_job(
    client: openai.OpenAI, stack: Stack, field: str, param: str, schema: dict[str, Any], says: str
) -> None:
    request = ask(stack, "JSON please")
    if field == "tools":  # a function's parameters are an object (OpenAI refuses another root)
        parameters = {"type": "object", **schema}
        request |= {"tools": [{"type": "function", "function": {"name": "f", "parameters": parameters}}]}
        request |= {"tool_choice": "required"}
    else:
        request |= {
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        }
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.with_raw_response.create(**request)
    assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
    assert "cannot be held to" in refused.value.message and says in refused.value.message
    assert "x-streamq-job-id" not in refused.value.response.headers


def test_a_valid_schema_the_worker_cannot_compile_names_its_field(
    client: openai.OpenAI, stack: Stack
) -> None:
    """A schema whose pattern xgrammar cannot take (a Unicode class), or that it finds malformed:
    found by the worker, whose error names the field as the client sent it, whole or streamed."""
    unicode_class: dict[str, Any] = {
        "type": "object",
        "properties": {"a": {"type": "string", "pattern": "^\\p{L}+$"}},
    }
    misspelt: dict[str, Any] = {"type": "object", "properties": {"a": {"type": "strin"}}}
    for schema in (unicode_class, misspelt):
        forced: dict[str, Any] = {
            "tools": [{"type": "function", "function": {"name": "f", "parameters": schema}}]
        }
        forced |= {"tool_choice": "required"}
        shaped: dict[str, Any] = {
            "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
        }
        for fields, param in ((shaped, "response_format"), (forced, "tools")):
            _fails_naming(client, stack, fields, param)
        # Responses: the same, in its own fields (text.format, and tools for a forced call).
        text_format = {"text": {"format": {"type": "json_schema", "name": "s", "schema": schema}}}
        function = {"type": "function", "name": "f", "parameters": schema}
        forced_call = {"tools": [function], "tool_choice": "required"}
        for fields, param in ((text_format, "text.format"), (forced_call, "tools")):
            _response_fails_naming(client, stack, fields, param)


def _fails_naming(client: openai.OpenAI, stack: Stack, fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**ask(stack, "JSON please"), **fields)
    assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
    assert "cannot be used for constrained decoding" in refused.value.message
    with pytest.raises(openai.APIError) as in_stream:
        list(client.chat.completions.create(**ask(stack, "JSON please"), **fields, stream=True))
    assert in_stream.value.body["param"] == param, in_stream.value.body  # type: ignore[index]


def _response_fails_naming(client: openai.OpenAI, stack: Stack, fields: dict[str, Any], param: str) -> None:
    asked: dict[str, Any] = {"model": stack.model_dir.name, "input": "JSON please", "max_output_tokens": 20}
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**asked, **fields)
    assert refused.value.body["param"] == param, refused.value.body  # type: ignore[index]
    assert refused.value.body["message"].startswith(f"{param}: "), refused.value.body  # type: ignore[index]
    events = list(client.responses.create(**asked, **fields, stream=True))
    errors = [e for e in events if e.type == "error"]
    assert [(e.param, e.message.split(":")[0]) for e in errors] == [(param, param)], errors
    assert events[-1].type == "response.failed"


class Address(BaseModel):
    city: str = Field(max_length=10)
    zip_code: int = Field(ge=0, le=99999)  # a bounded answer: a random model fills open integers


class Person(BaseModel):
    name: str = Field(max_length=8)
    home: Address
    friends: list[Address] = Field(max_length=1)


def test_a_forced_call_to_a_function_with_nested_models_follows_their_schema(
    client: openai.OpenAI, stack: Stack
) -> None:
    """pydantic_function_tool's parameters refer to their nested models with '#/$defs/…': a
    required call (the functions' schemas combined into one) still finds them."""
    person: Any = openai.pydantic_function_tool(Person)
    named: Any = {"type": "function", "function": {"name": "Person"}}
    # required with Person alone (its schema moves into the combined one), and named among two.
    cases: list[tuple[Any, Any]] = [("required", [person]), (named, [person, WEATHER])]
    for choice, tools in cases:
        whole = client.chat.completions.create(
            **ask(stack, "Who?", 400),
            tools=tools,
            tool_choice=choice,
            parallel_tool_calls=False,
            temperature=0.0,
        )
        call: Any
        (call,) = whole.choices[0].message.tool_calls or []
        assert call.function.name == "Person"
        Person.model_validate_json(call.function.arguments)
