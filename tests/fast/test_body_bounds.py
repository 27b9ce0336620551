"""Bodies the front refuses before any job exists, naming where: JSON nested past the bound a
worker can read back, a JSON Schema no value can follow, a key that is the empty string."""

from __future__ import annotations

from typing import Any

import pytest
from openai import BadRequestError
from openai.types.chat import ChatCompletionUserMessageParam

from tests.fast.conftest import Front, openai_of

pytestmark = pytest.mark.anyio

MODEL = "fake-model"
USER: ChatCompletionUserMessageParam = {"role": "user", "content": "hi"}


async def test_a_streamed_request_whose_schema_lists_an_empty_enum_is_a_400_not_a_stream(
    front: Front,
) -> None:
    """It opened with a 200 and ended with an error event (the grammar compiler's, in the
    worker): the SDK raised an APIError with no status. Now refused before a job exists."""
    empty: dict[str, object] = {"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}
    with pytest.raises(BadRequestError) as refused:
        await openai_of(front).chat.completions.create(
            model=MODEL,
            messages=[USER],
            stream=True,
            response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": empty}},
        )
    assert refused.value.body["param"] == "response_format.json_schema.schema"  # type: ignore[index]
    assert "'enum' lists no value" in refused.value.message
    assert not front.jobs.jobs


def _nested(depth: int) -> dict[str, Any]:
    """``{"a": {"a": … {}}}``: ``depth`` objects, one in another."""
    node: dict[str, Any] = {}
    for _ in range(depth - 1):
        node = {"a": node}
    return node


DEEP = {"type": "object", "x": _nested(300)}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (
            "/v1/chat/completions",
            {
                "messages": [USER],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": DEEP}}],
            },
            "tools.0.function.parameters",
        ),
        (
            "/v1/jobs",
            {
                "prompt": "x",
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": DEEP}},
            },
            "response_format.json_schema.schema.x",
        ),
        (
            "/v1/responses",
            {"input": "hi", "tools": [{"type": "function", "name": "f", "parameters": DEEP}]},
            "tools.0.parameters.x",
        ),
    ],
)
async def test_json_nested_past_the_bound_is_a_400_naming_where_and_makes_no_job(
    front: Front, path: str, body: dict[str, Any], param: str
) -> None:
    """A tool's parameters 300 deep was a 500 (pydantic stopped serializing them); 200 deep, a
    job its worker could not read back, failed as lost (a 502 the SDK retried). Brackets in a
    string are text, not nesting."""
    response = await front.http.post(path, json={"model": MODEL, **body})
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (400, "too_deep"), error
    assert error["param"] == param and "nested more than 160 levels deep" in error["message"], error
    assert not front.jobs.jobs
    text = await front.http.post("/v1/jobs", json={"model": MODEL, "prompt": "{[" * 400})
    assert text.status_code == 202, text.text


async def test_an_empty_key_is_named_as_the_unknown_parameter(front: Front) -> None:
    """``{"": 1}`` was refused as "'None' is not a parameter", naming no place."""
    for path, body in (("/v1/chat/completions", {"messages": [USER]}), ("/v1/jobs", {"prompt": "x"})):
        response = await front.http.post(path, json={"model": MODEL, **body, "": 1})
        error = response.json()["error"]
        assert (response.status_code, error["param"]) == (400, ""), error
        assert error["message"].startswith("'' is not a parameter"), error
