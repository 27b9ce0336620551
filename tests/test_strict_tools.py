"""``strict: true`` functions with ``tool_choice`` auto: the answer is free text, and a call,
once the model begins one (``<tool_call>``), is held to a declared function and, where strict,
to its parameters (api.strict_tools's structural tag, compiled by xgrammar). On the transformers
engine with the tiny model, whose random weights never begin a call by themselves: a job is
continued from an answer that just began one, as after a worker's crash, so the grammar takes
over at the call's first token. The same tag through vLLM's engine: taken, and the job runs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from api.errors import ApiError
from api.strict_tools import strict_calls_grammar
from api.tool_calls import plan_tools, read_whole
from shared.schemas import ToolDefinition
from tests.engine_outputs import ids_of
from tests.test_engine import drive, job, request
from worker.batch_lm import BatchedCausalLM

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1}},
    "required": ["city", "days"],
    "additionalProperties": False,
}


def tools(strict: bool | None = True) -> list[ToolDefinition]:
    return [
        ToolDefinition.model_validate(
            {"type": "function", "function": {"name": "weather", "parameters": WEATHER, "strict": strict}}
        ),
        ToolDefinition.model_validate(
            {"type": "function", "function": {"name": "note", "parameters": {"type": "object"}}}
        ),
    ]


def test_a_call_begun_is_held_to_a_declared_function_and_its_strict_parameters(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    given = tools()
    tag = strict_calls_grammar(given)
    began = tiny_backend.tokenizer.encode("Let me look. <tool_call>", add_special_tokens=False)
    for seed in range(4):
        calling = job(
            # The tools are not rendered into the prompt: the tiny model's context has no room for them.
            request("weather?", structural_tag=tag, temperature=1.0, seed=seed, max_tokens=120)
        )
        calling.resume_ids = began
        seen = drive(batched, [calling], {})
        text = tiny_backend.tokenizer.decode(began + ids_of(seen, calling), skip_special_tokens=True)
        plan = plan_tools(given, "auto", None, None)
        _, calls = read_whole(plan, "job", text, cut=False)
        assert calls, repr(text)  # the call is whole: it names a declared function, its JSON parses
        for call in calls:
            name, arguments = call["function"]["name"], json.loads(call["function"]["arguments"])
            assert name in ("weather", "note"), text
            if name == "weather":
                import jsonschema

                jsonschema.validate(arguments, WEATHER)
            else:
                assert isinstance(arguments, dict)


def test_no_strict_function_no_grammar_and_a_strict_schema_it_cannot_hold_is_a_400() -> None:
    assert strict_calls_grammar(tools(strict=None)) is None
    assert strict_calls_grammar(tools(strict=False)) is None
    bad = ToolDefinition.model_validate(
        {
            "type": "function",
            "function": {"name": "f", "strict": True, "parameters": {"type": "object", "not": {}}},
        }
    )
    with pytest.raises(ApiError) as refused:
        strict_calls_grammar([*tools(strict=None), bad])
    assert refused.value.param == "tools.2.function.parameters"
