"""Reading tool calls out of a model's text (``api.tool_calls``), whole and as it streams in, and
what ``tools`` / ``tool_choice`` ask of a job."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from api.errors import ApiError
from api.tool_calls import NamedToolChoice, ToolCallReader, ToolPlan, plan_tools, read_whole
from shared.schemas import ToolDefinition

WEATHER = ToolDefinition.model_validate(
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
)
AUTO = ToolPlan("auto", [WEATHER])
TWO_CALLS = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
)


def streamed(plan: ToolPlan, text: str, seed: int, cut: bool = False) -> list[dict[str, Any]]:
    """The deltas of ``text`` fed in random pieces (as a job's deltas come; ``cut``: it ended at
    its length limit)."""
    rng = random.Random(seed)
    reader = ToolCallReader(plan, "job1")
    deltas: list[dict[str, Any]] = []
    at = 0
    while at < len(text):
        size = rng.randint(1, 7)
        deltas += reader.feed(text[at : at + size])
        at += size
    return deltas + reader.finish(cut)


def test_hermes_calls_are_read_whole_and_streamed_alike() -> None:
    content, calls = read_whole(AUTO, "job1", TWO_CALLS)
    assert content == "Let me check."
    assert [(c["id"], c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("call_job1_0", "get_weather", {"city": "Paris"}),
        ("call_job1_1", "get_weather", {"city": "Oslo"}),
    ]
    for seed in range(20):
        deltas = streamed(AUTO, TWO_CALLS, seed)
        assert "".join(d.get("content", "") for d in deltas) == "Let me check."  # as the whole answer's
        streamed_calls = [c for d in deltas for c in d.get("tool_calls", [])]
        assert [c["index"] for c in streamed_calls] == [0, 1]
        assert [c["function"]["arguments"] for c in streamed_calls] == [
            c["function"]["arguments"] for c in calls
        ]


def test_text_after_a_call_keeps_its_line_breaks_however_its_deltas_are_cut() -> None:
    """Whitespace goes with the text that follows it, calls between or not; the answer's leading
    whitespace, and its trailing whitespace after a call, are no content. So the content streamed
    in any pieces (a delta of only a newline is common) is the whole answer's."""
    after = "Result:\n- a\n- b 🙂"
    text = "\n" + TWO_CALLS + "\n\n" + after + "\n"
    content, calls = read_whole(AUTO, "job1", text)
    assert len(calls) == 2 and content == "Let me check.\n\n\n\n" + after
    for seed in range(30):
        deltas = streamed(AUTO, text, seed)
        assert "".join(d.get("content", "") for d in deltas) == content
    glued = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert read_whole(AUTO, "j", "Hello\n" + glued + "world")[0] == "Hello\nworld"
    pieces = [glued, "\n", "\n", "Done", " ", "."]
    reader = ToolCallReader(AUTO, "j")
    deltas = [d for piece in pieces for d in reader.feed(piece)] + reader.finish()
    assert [d.get("content") for d in deltas if "content" in d] == ["Done", " ."]
    plain = ToolCallReader(AUTO, "j")  # no call: an answer's trailing whitespace is its own
    assert [d for piece in ("Hi", " ", "\n") for d in plain.feed(piece)] + plain.finish() == [
        {"content": "Hi"},
        {"content": " \n"},
    ]


def test_text_that_only_looks_like_a_call_stays_text() -> None:
    for text in ("a < b and <tool_ call> no", "<tool_call>not json</tool_call> after", "x <tool_cal"):
        content, calls = read_whole(AUTO, "j", text)
        assert (content, calls) == (text, [])
        assert "".join(d.get("content", "") for d in streamed(AUTO, text, 3)) == text


def test_a_call_cut_before_its_closing_tag_is_a_call_when_its_json_is_whole() -> None:
    content, calls = read_whole(AUTO, "j", '<tool_call>{"name": "get_weather", "arguments": {"city": "x"}}')
    assert content is None and calls[0]["function"]["arguments"] == '{"city": "x"}'
    content, calls = read_whole(AUTO, "j", '<tool_call>{"name": "get_wea')
    assert (content, calls) == ('<tool_call>{"name": "get_wea', [])  # ended there: the model's text


@pytest.mark.parametrize(
    ("text", "cut", "arguments"),
    [
        # max_tokens cut it inside its closing tag, its JSON whole (an agent's trial: no call,
        # and the markup as content).
        (
            '<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_cal',
            True,
            ['{"city": "A"}'],
        ),
        # A call, then the first characters of the next: they are no content.
        ('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>\n<', True, ["{}"]),
        ('<tool_call>{"name": "get_weather", "arguments": {}}</tool_call> <tool_', True, ["{}"]),
        # Cut in its arguments (max_tokens, or a stop sequence): a call, as far as they came, as a
        # forced call cut short is.
        ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Os', True, ['{"city": "Os']),
        ('<tool_call>{"name": "get_weather", "arguments": {"city": "Os', False, ['{"city": "Os']),
        # Cut before its name is whole: no call, and no markup as content.
        ('<tool_call>\n{"name": "get_wea', True, []),
    ],
)
def test_an_answer_cut_in_a_call_gives_the_call_and_no_markup(
    text: str, cut: bool, arguments: list[str]
) -> None:
    content, calls = read_whole(AUTO, "j", text, cut=cut)
    assert [c["function"]["arguments"] for c in calls] == arguments
    assert content in (None, ""), content
    assert all(c["function"]["name"] == "get_weather" for c in calls)
    for seed in range(10):  # streamed in any pieces, the same
        deltas = streamed(AUTO, text, seed, cut)
        assert "".join(d.get("content", "") for d in deltas) == ""
        assert [c["function"]["arguments"] for d in deltas for c in d.get("tool_calls", [])] == arguments


def test_forced_calls_read_the_guided_json() -> None:
    named = plan_tools(
        [WEATHER],
        NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_weather"}}),
        None,
    )
    assert named.json_schema == WEATHER.function.parameters
    deltas = streamed(named, '{"city": "Lima"}', 1)
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas) == '{"city": "Lima"}'
    assert read_whole(named, "j", '{"city": "Lima"}')[1][0]["function"]["arguments"] == '{"city": "Lima"}'

    required = plan_tools([WEATHER], "required", False)
    assert required.json_schema is not None and required.json_schema["maxItems"] == 1
    calls = read_whole(required, "j", '[{"name": "get_weather", "arguments": {"city": "Rome"}}]')[1]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Rome"}
    assert read_whole(required, "j", '[{"name": "get_we') == ("", [])  # cut before a name: nothing
    # Cut inside a call's arguments (max_tokens): a call, with the arguments as far as they came.
    begun = read_whole(required, "j", '[{"name": "get_weather", "arguments": {"city": "Ro', cut=True)[1]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in begun] == [
        ("get_weather", '{"city": "Ro')
    ]
    named_only = read_whole(required, "j", '[{"name": "get_weather", "argu', cut=True)[1]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in named_only] == [("get_weather", "")]
    # Ended by the client's stop sequence: the call streamed as far as it came stands, as the length.
    stopped = read_whole(required, "j", '[{"name": "get_weather", "arguments": {"city": "Ro')[1]
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in stopped] == [
        ("get_weather", '{"city": "Ro')
    ]
    # A name JSON cannot read is no call: the model's text, whole.
    unreadable = '[{"name": "get_\\q", "arguments": {'
    assert read_whole(required, "j", unreadable, cut=True) == (unreadable, [])
    # Cut short after a whole call (a small model that keeps adding calls): that call stands.
    cut = '[{"name": "get_weather", "arguments": {"city": "Rome"}}, {"name": "get_w'
    assert [c["function"]["name"] for c in read_whole(required, "j", cut)[1]] == ["get_weather"]


@pytest.mark.parametrize(
    ("tools", "choice", "param"),
    [
        (None, "required", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "tool_choice"),
    ],
)
def test_tool_choices_that_cannot_be_served_name_their_field(
    tools: list[ToolDefinition] | None, choice: Any, param: str
) -> None:
    if isinstance(choice, dict):
        choice = NamedToolChoice.model_validate(choice)
    with pytest.raises(ApiError) as refused:
        plan_tools(tools, choice, None)
    assert refused.value.status == 400 and refused.value.param == param


def test_only_a_forced_calls_schema_is_checked_for_what_the_grammar_cannot_hold() -> None:
    """With ``auto`` a call is read as the model wrote it (no grammar), so a schema the grammar
    would not enforce is no reason to refuse an agent's tools; a forced call is held to it."""
    sets = ToolDefinition.model_validate(
        {
            "type": "function",
            "function": {
                "name": "tag",
                "parameters": {
                    "type": "object",
                    "properties": {"tags": {"type": "array", "uniqueItems": True}},
                },
            },
        }
    )
    assert plan_tools([WEATHER, sets], "auto", None).mode == "auto"
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "tag"}})
    for choice in ("required", named):
        with pytest.raises(ApiError) as refused:
            plan_tools([WEATHER, sets], choice, None)
        assert refused.value.param == "tools.1.function.parameters"
        assert "'uniqueItems' is not enforced" in refused.value.message


def test_tool_choice_none_gives_the_job_no_tools() -> None:
    assert plan_tools([WEATHER], "none", None) == ToolPlan()
    assert plan_tools([WEATHER], None, None).mode == "auto"


def test_one_call_at_most_in_auto_mode_ends_the_answer_after_the_first() -> None:
    plan = plan_tools([WEATHER], "auto", False)
    assert plan.job_fields("\n\n")["stop"] == ["\n\n", "</tool_call>"]
    # The answer as the stop sequence leaves it: the first call, unclosed.
    content, calls = read_whole(
        plan, "j", 'Ok.<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n'
    )
    assert content == "Ok." and len(calls) == 1


def test_a_required_answer_that_is_not_a_list_of_calls_stays_text() -> None:
    required = plan_tools([WEATHER], "required", None)
    assert read_whole(required, "j", "[1, 2]") == ("[1, 2]", [])
    assert read_whole(required, "j", '[{"nom": "x"}]') == ('[{"nom": "x"}]', [])
    # A call, then an item that is none: the call came out as it streamed and stands; what
    # follows it is the model's text (nothing is dropped).
    mixed = '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, 5]'
    content, calls = read_whole(required, "j", mixed)
    assert content == "5]" and [c["function"]["arguments"] for c in calls] == ['{"city": "Oslo"}']


def test_required_calls_stream_as_they_are_written() -> None:
    """Each call comes out once its name is whole, then its arguments piece by piece (as OpenAI
    streams them, and as the named function's do), however the text is cut; the same calls as
    the whole answer's."""
    required = plan_tools(
        [
            WEATHER,
            WEATHER.model_copy(update={"function": WEATHER.function.model_copy(update={"name": "get_time"})}),
        ],
        "required",
        None,
    )
    text = (
        '[{"name": "get_weather", "arguments": {"city": "Rome \\"Eternal\\" [city]"}}, '
        '{"name": "get_time", "arguments": {"city": "Lima", "n": [1, {"a": null}]}}]'
    )
    content, calls = read_whole(required, "j", text)
    assert content is None and [
        (c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls
    ] == [
        ("get_weather", {"city": 'Rome "Eternal" [city]'}),
        ("get_time", {"city": "Lima", "n": [1, {"a": None}]}),
    ]
    for seed in range(30):
        deltas = streamed(required, text, seed)
        pieces = [c for d in deltas for c in d.get("tool_calls", [])]
        heads = [c for c in pieces if "id" in c]
        assert [(c["index"], c["function"]["name"]) for c in heads] == [(0, "get_weather"), (1, "get_time")]
        for index, call in enumerate(calls):
            arguments = "".join(c["function"]["arguments"] for c in pieces if c["index"] == index)
            assert arguments == call["function"]["arguments"]
        assert not any(d.get("content") for d in deltas)
    # The first call is out, with the first of its arguments, before its arguments are whole.
    reader = ToolCallReader(required, "j")
    early = reader.feed('[{"name": "get_weather", "arguments": {"ci')
    assert [c["function"] for d in early for c in d["tool_calls"]] == [
        {"name": "get_weather", "arguments": ""},
        {"arguments": '{"ci'},
    ]
