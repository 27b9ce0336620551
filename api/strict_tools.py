"""``strict: true`` on a function the model may call (``tool_choice`` auto, or a job's tools):
the call is held to the function's parameters, as OpenAI's strict mode holds it, while the answer
stays free to be text.

The job gets a grammar in xgrammar's structural-tag form (``triggered_tags``, which both engines
compile: vLLM's structured outputs take it as ``structural_tag``): text is free until the model
writes ``<tool_call>`` (Hermes' format, the one streamq reads calls in); from there the call must
be ``<tool_call>\\n{"name": <a declared function>, "arguments": <JSON>}\\n</tool_call>``, and the
arguments follow the function's schema where it is strict, or are any JSON object where it is
not. So a call names a declared function and its arguments parse, with every strict function's
schema kept. Without a strict function nothing changes: calls are read as the model wrote them.

A strict function's schema is checked as a forced call's is (``json_schema_check``): one the
grammar would not hold an answer to is a 400 naming it.

Tools beside a JSON ``response_format`` (``tool_choice`` auto) get one tag for both, as OpenAI
serves them: the answer is one call or more, or the JSON answer (``calls_or_json_grammar``).
"""

from __future__ import annotations

from typing import Any

from api.errors import ApiError
from api.tool_calls import check_functions
from shared.schemas import ToolDefinition
from shared.schemas.json_schema_check import Budget, schema_problem
from shared.tool_call_format import call_tag, calls_in_text, calls_or_json

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # a call's arguments, or a json_object answer


def strict_calls_grammar(tools: list[ToolDefinition] | None) -> dict[str, Any] | None:
    """The structural tag that holds calls to ``tools`` (None when none is strict), or a 400
    naming the first strict function whose schema the grammar cannot hold a call to."""
    if not tools or not any(tool.function.strict for tool in tools):
        return None
    return calls_in_text(_call_tags(tools))


def calls_or_json_grammar(tools: list[ToolDefinition], answer: dict[str, Any]) -> dict[str, Any]:
    """The structural tag for tools beside a JSON ``response_format`` (``answer``: its schema, or
    any object for ``json_object``), as OpenAI serves the two together: the answer is either
    JSON following ``answer`` (one blank at most between tokens) or one call or more, each held
    as ``strict_calls_grammar`` holds it (a function that is not strict takes any JSON object).
    The model chooses which with its first token; no text around either. No newline in it: the
    job gets the JSON answer's token mask (no raw control character), for xgrammar lets a raw
    tab into a string with a length limit, which is not JSON; so the calls are written
    ``<tool_call>{…}</tool_call>``, one after another, as Hermes' reader takes them too."""
    return calls_or_json(_call_tags(tools, newline=""), answer)


def _call_tags(tools: list[ToolDefinition], newline: str = "\n") -> list[dict[str, Any]]:
    """A tag per function (held to its schema where it is strict, else any JSON object); a 400
    naming the first strict function whose schema the grammar cannot hold a call to."""
    check_functions(tools)  # as the chat route's: two tags of one name would take either schema
    budget = Budget()
    tags = []
    for index, tool in enumerate(tools):
        function = tool.function
        arguments = ANY_OBJECT
        if function.strict:
            arguments = function.parameters or {"type": "object", "properties": {}}
            if (problem := schema_problem(arguments, budget)) is not None:
                raise ApiError(
                    400,
                    f"a strict call to '{function.name}' cannot be held to its parameters: {problem}",
                    param=f"tools.{index}.function.parameters",
                    code="invalid_function_parameters",
                )
        tags.append(call_tag(function.name, arguments, newline))
    return tags
