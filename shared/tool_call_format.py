"""How a model writes a tool call in its answer: Hermes' format, the one streamq reads calls in
(api.tool_calls) and holds strict calls to (api.strict_tools), on both engines; and the shapes of
the xgrammar structural tags that hold them, which the front builds and the workers read back
(``GenerationRequest.json_or_calls``): one place for both sides."""

from __future__ import annotations

import json
from typing import Any

OPEN, CLOSE = "<tool_call>", "</tool_call>"


def call_tag(name: str, arguments: dict[str, Any], newline: str = "\n") -> dict[str, Any]:
    """The tag of a call to ``name``: its opening with the name, its ``arguments`` schema (one
    blank at most between tokens: as a model spaces JSON, but no padding on), its close."""
    return {
        "type": "tag",
        "begin": f'{OPEN}{newline}{{"name": {json.dumps(name)}, "arguments": ',
        "content": {"type": "json_schema", "json_schema": arguments, "max_whitespace_cnt": 1},
        "end": f"}}{newline}{CLOSE}",
    }


def calls_in_text(tags: list[dict[str, Any]]) -> dict[str, Any]:
    """Text free until the model writes ``<tool_call>``, then a call held to one of ``tags``."""
    triggered = {"type": "triggered_tags", "triggers": [OPEN], "tags": tags}
    return _structural_tag(triggered | {"at_least_one": False, "stop_after_first": False})


def calls_or_json(tags: list[dict[str, Any]], answer: dict[str, Any]) -> dict[str, Any]:
    """Either JSON following the schema ``answer``, or one call or more held to ``tags`` (written
    without newlines: ``call_tag(..., newline="")``), one after another; nothing around either."""
    calls = {"type": "tags_with_separator", "tags": tags, "separator": " "}
    json_answer = {"type": "json_schema", "json_schema": answer, "max_whitespace_cnt": 1}
    return _structural_tag(
        {"type": "or", "elements": [json_answer, calls | {"at_least_one": True, "stop_after_first": False}]}
    )


def json_answer_schema(tag: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON answer's schema of a ``calls_or_json`` tag; None for any other (or none)."""
    tag_format = (tag or {}).get("format", {})
    if tag_format.get("type") != "or":
        return None
    schema: dict[str, Any] = tag_format["elements"][0]["json_schema"]
    return schema


def _structural_tag(format_: dict[str, Any]) -> dict[str, Any]:
    return {"type": "structural_tag", "format": format_}
