"""One tool call as a model writes it in Hermes' format (``<tool_call>{"name": …, "arguments":
…}</tool_call>``, ``shared.tool_call_format``), read out of a call's block of text: whole, or as
far as an answer cut short (its length limit, a stop sequence) let it come."""

from __future__ import annotations

import json
import re

from shared.tool_call_format import CLOSE

# A call begun: its name whole, its arguments begun (``{"name": "f", "arguments": {"a": 1``).
_BEGUN = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*', re.S)


def hermes_call(block: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of one ``<tool_call>`` block's JSON, or None if it is not one."""
    try:  # not strict: a raw tab or newline in a string (xgrammar lets them into one with a length
        # limit) is read as escaped, and the arguments are written out again escaped
        value = json.loads(block, strict=False)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return value["name"], text


def cut_call(rest: str) -> tuple[str, str] | None:
    """The call an answer that ended inside one had made (``rest``: the text after its
    ``<tool_call>``): whole, with what it had of its closing tag left off; or, once its name is
    whole, with its arguments as far as they came (as a forced call cut short is); None before."""
    body = rest.rstrip()
    closing = next((n for n in range(len(CLOSE) - 1, 0, -1) if body.endswith(CLOSE[:n])), 0)
    body = body[: len(body) - closing].strip()
    whole = hermes_call(body)
    if whole is not None:
        return whole
    begun = _BEGUN.match(body)
    if begun is None:
        return None
    try:
        name = json.loads(f'"{begun[1]}"', strict=False)
    except ValueError:
        return None
    return name, body[begun.end() :]
