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
"""

from __future__ import annotations

import json
from typing import Any

from api.errors import ApiError
from api.tool_calls import check_functions
from shared.schemas import ToolDefinition
from shared.schemas.json_schema_check import Budget, schema_problem
from shared.tool_call_format import CLOSE, OPEN

ANY_ARGUMENTS: dict[str, Any] = {"type": "object"}


def strict_calls_grammar(tools: list[ToolDefinition] | None) -> dict[str, Any] | None:
    """The structural tag that holds calls to ``tools`` (None when none is strict), or a 400
    naming the first strict function whose schema the grammar cannot hold a call to."""
    if not tools or not any(tool.function.strict for tool in tools):
        return None
    check_functions(tools)  # as the chat route's: two tags of one name would take either schema
    budget = Budget()
    tags = []
    for index, tool in enumerate(tools):
        function = tool.function
        arguments = ANY_ARGUMENTS
        if function.strict:
            arguments = function.parameters or {"type": "object", "properties": {}}
            if (problem := schema_problem(arguments, budget)) is not None:
                raise ApiError(
                    400,
                    f"a strict call to '{function.name}' cannot be held to its parameters: {problem}",
                    param=f"tools.{index}.function.parameters",
                    code="invalid_function_parameters",
                )
        tags.append(
            {
                "type": "tag",
                "begin": f'{OPEN}\n{{"name": {json.dumps(function.name)}, "arguments": ',
                # One blank at most between tokens: as a model spaces JSON, but no padding on.
                "content": {"type": "json_schema", "json_schema": arguments, "max_whitespace_cnt": 1},
                "end": f"}}\n{CLOSE}",
            }
        )
    return {
        "type": "structural_tag",
        "format": {
            "type": "triggered_tags",
            "triggers": [OPEN],
            "tags": tags,
            "at_least_one": False,
            "stop_after_first": False,
        },
    }
