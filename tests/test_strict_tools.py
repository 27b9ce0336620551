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
from api.strict_tools import calls_or_json_grammar, strict_calls_grammar
from api.tool_calls import plan_tools, read_whole
from shared.schemas import ToolDefinition
from tests.engine_driving import drive, job, request
from tests.engine_outputs import ids_of
from worker.batch_lm import BatchedCausalLM

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 30},
    },
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
        plan = plan_tools(given, "auto", None)
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


ANSWER = {
    "type": "object",
    "properties": {"total": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["total"],
    "additionalProperties": False,
}


def test_tools_beside_a_json_format_answer_the_json_or_calls(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    """The tiny model's sampled answers under the calls-or-JSON tag: each is JSON following the
    answer's schema, or calls (read back as the chat route reads them) to the declared function
    with arguments following its schema; a job continued from a call it began stays a call."""
    import jsonschema

    given = tools()[:1]  # weather, strict: its calls are short (a city of 12 characters at most)
    tag = calls_or_json_grammar(given, ANSWER)
    plan = plan_tools(given, "auto", None)
    answers = []
    for seed in range(4):
        answering = job(request("sum?", structural_tag=tag, temperature=1.0, seed=seed, max_tokens=200))
        seen = drive(batched, [answering], {})
        end = seen.end(answering)
        assert end is not None and end.finish_reason in ("stop", "length") and not end.error_type, end
        answers.append((seen.text(answering), end.finish_reason == "length"))
    began = tiny_backend.tokenizer.encode('<tool_call>{"name": "we', add_special_tokens=False)
    calling = job(request("sum?", structural_tag=tag, temperature=1.0, seed=9, max_tokens=200))
    calling.resume_ids = began
    seen = drive(batched, [calling], {})
    end = seen.end(calling)
    assert end is not None
    text = tiny_backend.tokenizer.decode(began + ids_of(seen, calling), skip_special_tokens=True)
    answers.append((text, end.finish_reason == "length"))
    for text, cut in answers:
        content, calls = read_whole(plan, "job", text, cut=cut)
        if calls or text.startswith("<tool_call>"):
            assert calls and not content, text  # nothing but calls (cut short too: no markup)
            for call in calls[: -1 if cut else None]:  # the one max_tokens cut: its arguments as they came
                assert call["function"]["name"] == "weather", text
                jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
        else:
            jsonschema.validate(json.loads(text), ANSWER)
    assert answers[-1][0].startswith('<tool_call>{"name": "weather"')


def test_a_json_answer_beside_tools_has_no_raw_control_character_in_a_string(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    """xgrammar lets a raw tab into a string with a length limit (pydantic's max_length): beside
    tools the job had strict calls' token mask, which keeps tabs, and a tab pushed as hard as a
    client can push it (logit_bias) made the answer JSON no reader takes. It has the JSON
    answer's mask: the answer parses."""
    tab = tiny_backend.tokenizer.convert_tokens_to_ids(tiny_backend.tokenizer.tokenize("a\tb"))
    tabs = [i for i in tab if "\t" in tiny_backend.tokenizer.decode([i])]
    assert tabs, tab
    named = {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 8}},
        "required": ["name"],
    }
    tag = calls_or_json_grammar(tools(strict=None), named)
    asked = request("name?", structural_tag=tag, logit_bias=dict.fromkeys(tabs, 100.0), max_tokens=40)
    answering = job(asked)
    answering.resume_ids = tiny_backend.tokenizer.encode('{"name": "a', add_special_tokens=False)
    seen = drive(batched, [answering], {})
    text = tiny_backend.tokenizer.decode(
        answering.resume_ids + ids_of(seen, answering), skip_special_tokens=True
    )
    assert "\t" not in text.split('"name": "', 1)[1].split('"', 1)[0], repr(text)
    assert len(json.loads(text)["name"]) <= 8, repr(text)


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


def test_a_schema_with_no_way_on_fails_the_job_naming_tools(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    never = {
        "type": "object",
        "properties": {"a": {"type": "string", "pattern": "^a[^\\s\\S]$"}},
        "required": ["a"],
    }
    given = [
        ToolDefinition.model_validate(
            {"type": "function", "function": {"name": "f", "parameters": never, "strict": True}}
        )
    ]
    calling = job(request("f?", structural_tag=strict_calls_grammar(given), max_tokens=60))
    calling.resume_ids = tiny_backend.tokenizer.encode(
        '<tool_call>\n{"name": "f", "arguments": {"a": "a', add_special_tokens=False
    )
    end = drive(batched, [calling], {}).end(calling)
    assert end is not None and (end.error_type, end.error_param) == ("invalid_request_error", "tools")
    # Beside a JSON format, the failure names the field whose branch the answer took.
    beside = calls_or_json_grammar(given, never)
    for began, field in (
        ('{"a": "a', "response_format"),
        ('<tool_call>{"name": "f", "arguments": {"a": "a', "tools"),
    ):
        answering = job(request("f?", structural_tag=beside, max_tokens=60))
        answering.resume_ids = tiny_backend.tokenizer.encode(began, add_special_tokens=False)
        end = drive(batched, [answering], {}).end(answering)
        assert end is not None and (end.error_type, end.error_param) == ("invalid_request_error", field), (
            began
        )


def test_a_raw_tab_in_a_strict_calls_string_is_still_a_call() -> None:
    """xgrammar's rule for a string with a length limit lets a raw tab in: the call is read, its
    arguments written out again with the tab escaped."""
    plan = plan_tools(tools(), "auto", None)
    _, calls = read_whole(
        plan,
        "job",
        '<tool_call>\n{"name": "weather", "arguments": {"city": "a\tb", "days": 2}}\n</tool_call>',
    )
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "a\tb", "days": 2}]


def test_the_job_apis_strict_tools_are_checked_as_the_chat_routes() -> None:
    twice = [*tools(), *tools()]
    with pytest.raises(ApiError) as refused:
        strict_calls_grammar(twice)
    assert refused.value.param == "tools.2.function.name"
    flat = ToolDefinition.model_validate(
        {"type": "function", "function": {"name": "f", "strict": True, "parameters": {"type": "string"}}}
    )
    with pytest.raises(ApiError) as refused:
        strict_calls_grammar([flat])
    assert refused.value.param == "tools.0.function.parameters"


@pytest.mark.parametrize(
    ("answered", "inside"),
    [
        ("Let me look.", False),
        (
            'Sure. <tool_call>\n{"name": "weather", "arguments": {"city": "Oslo", "days": 1}}'
            "\n</tool_call> and",
            False,
        ),
        ('Let me look. <tool_call>\n{"name": "wea', True),
        ("Let me look. <tool_", True),  # where a call may be beginning
        ("Let me look. <", True),
    ],
)
def test_vllm_continues_an_answer_with_strict_calls_only_between_calls(answered: str, inside: bool) -> None:
    from worker.engine import CannotContinue
    from worker.vllm_engine import check_continuable

    strict = request("weather?", structural_tag=strict_calls_grammar(tools()))
    if inside:
        with pytest.raises(CannotContinue):
            check_continuable(strict, answered)
    else:
        check_continuable(strict, answered)
    check_continuable(request("weather?"), answered)  # no strict function: any answer goes on
