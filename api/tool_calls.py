"""Tool calling on the chat route: what a request's ``tools`` and ``tool_choice`` ask of the job,
and how the job's text becomes ``tool_calls``.

- ``none``: the job gets no tools (the template renders none) and its text is the content.
- ``auto`` (the default with tools): the chat template renders the tools; the model answers in
  text or calls in Hermes' format, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (Qwen2.5, Hermes and others; workers announce the ``tools`` feature only for templates that
  use it), parsed here as the text streams in.
- ``required`` and a named function: guided decoding makes the answer JSON that validates (a
  list of calls, read as it streams by ``api.required_calls``, or the named function's
  arguments), so even a small model returns a valid call; ``parallel_tool_calls: false``
  allows one call. Both stream a call's arguments as they come.

The job's own text stays the model's raw output (the job API shows it as it is); only the
OpenAI answer is shaped here. A call's id is derived from its job's id, so an answer read
twice (a re-attached stream) names its calls the same way.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from api.errors import ApiError
from api.hermes_calls import cut_call, hermes_call
from api.required_calls import Arguments, Call, Event, RequiredCalls
from shared.schemas import ToolDefinition
from shared.schemas.json_schema_check import (
    ONE_SCHEMA,
    SCHEMA_LISTS,
    SCHEMA_MAPS,
    Budget,
    schema_problem,
    subschemas,
)
from shared.tool_call_format import CLOSE, OPEN


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
Mode = Literal["off", "auto", "required", "named"]


@dataclass(frozen=True)
class ToolPlan:
    """How a request's tools run: the tools the job is given, the JSON schema that forces a
    call (required, named), and how its text is read back."""

    mode: Mode = "off"
    tools: list[ToolDefinition] = field(default_factory=list)
    json_schema: dict[str, Any] | None = None
    function: str | None = None  # named: the function called
    stop: tuple[str, ...] = ()  # auto with parallel_tool_calls false: the answer ends after one call

    @property
    def forces_call(self) -> bool:
        """Whether the answer must be a call (required, named): its grammar is the tools'."""
        return self.mode in ("required", "named")

    def job_fields(self, stop: str | list[str] | None) -> dict[str, Any]:
        """What the plan adds to the job request (whose own ``stop`` is given)."""
        fields: dict[str, Any] = {}
        if self.tools:
            fields["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        if self.json_schema is not None:
            forced = {"name": "tool_call", "schema": self.json_schema}
            fields["response_format"] = {"type": "json_schema", "json_schema": forced}
        if self.stop:
            fields["stop"] = ([stop] if isinstance(stop, str) else list(stop or [])) + list(self.stop)
        return fields


def _parameters(tool: ToolDefinition) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def check_functions(tools: list[ToolDefinition] | None) -> None:
    """A 400 naming the first function whose name is given twice (a call naming it could not be
    told from the other's) or whose parameters are not an object's schema (a call's arguments
    are an object's keys), in OpenAI's words."""
    seen: set[str] = set()
    for index, tool in enumerate(tools or []):
        if tool.function.name in seen:  # a call naming it could not be told from the other's
            message = f"the function name '{tool.function.name}' is given twice: names must be unique"
            raise ApiError(400, message, param=f"tools.{index}.function.name")
        seen.add(tool.function.name)
        parameters = tool.function.parameters
        if parameters and parameters.get("type") != "object":  # the arguments are an object's keys
            raise ApiError(
                400,
                f"Invalid schema for function '{tool.function.name}': schema must be a JSON Schema of "
                f"'type: \"object\"', got 'type: \"{parameters.get('type')}\"'.",
                param=f"tools.{index}.function.parameters",
                code="invalid_function_parameters",  # OpenAI's code for this refusal
            )


def plan_tools(
    tools: list[ToolDefinition] | None,
    choice: ToolChoice | None,
    parallel: bool | None,
) -> ToolPlan:
    """The plan for these fields, or a 400 naming the one that cannot be served. A JSON
    ``response_format`` beside them is the answer's when the model answers instead of calling
    (``api.request_limits.answer_grammar``); a forced call has no answer for it to hold."""
    check_functions(tools)
    if not tools:
        if choice not in (None, "none"):
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        return ToolPlan()
    if choice == "none":
        return ToolPlan()
    if choice is None or choice == "auto":
        # One call at most: the answer stops at the end of the first (read as a call when the
        # JSON before it is whole).
        return ToolPlan("auto", list(tools), stop=(CLOSE,) if parallel is False else ())
    if choice == "required":
        _check_held_to(tools, range(len(tools)))
        calls, defs = [], {}
        for index, tool in enumerate(tools):
            arguments = _parameters(tool)
            if _has_refs(arguments):  # its '#…' references must find it at the root's $defs
                defs[f"tool{index}"] = _rebased(arguments, f"#/$defs/tool{index}")
                arguments = {"$ref": f"#/$defs/tool{index}"}
            calls.append(
                {
                    "type": "object",
                    "properties": {"name": {"const": tool.function.name}, "arguments": arguments},
                    "required": ["name", "arguments"],
                    "additionalProperties": False,
                }
            )
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if defs:
            schema["$defs"] = defs
        if parallel is False:
            schema["maxItems"] = 1
        return ToolPlan("required", list(tools), schema)
    assert isinstance(choice, NamedToolChoice)
    named = [t for t in tools if t.function.name == choice.function.name]
    if not named:
        raise ApiError(
            400,
            f"tool_choice names '{choice.function.name}', which is not among the tools",
            param="tool_choice",
        )
    _check_held_to(tools, [tools.index(named[0])])
    return ToolPlan("named", list(tools), _parameters(named[0]), choice.function.name)


def _check_held_to(tools: list[ToolDefinition], forced: Iterable[int]) -> None:
    """A 400 naming the first forced function whose call cannot be held to its parameters'
    schema. (With ``auto`` a call is read as the model wrote it: no schema is enforced, none
    is checked.)"""
    budget = Budget()  # one for the request: many large functions are no way around the limit
    for index in forced:
        function = tools[index].function
        if (problem := schema_problem(function.parameters, budget)) is not None:
            raise ApiError(
                400,
                f"a call to '{function.name}' cannot be held to its parameters: {problem}",
                param=f"tools.{index}.function.parameters",
                code="invalid_function_parameters",  # OpenAI's code for this refusal
            )


def _has_refs(schema: dict[str, Any]) -> bool:
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node.get("$ref"), str):
            return True
        pending.extend(inner for _, inner in subschemas(node))
    return False


def _rebased(node: dict[str, Any], base: str) -> dict[str, Any]:
    """A copy of schema ``node`` whose ``#…`` references point where it now lives, at ``base``
    (a function's parameters, moved into a forced call's combined schema)."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            out[key] = base + value[1:]
        elif key in SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: _rebased(s, base) if isinstance(s, dict) else s for name, s in value.items()}
        elif key in SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_rebased(s, base) if isinstance(s, dict) else s for s in value]
        elif key in ONE_SCHEMA and isinstance(value, dict):
            out[key] = _rebased(value, base)
        else:
            out[key] = value
    return out


def _call(call_id: str, index: int, name: str, arguments: str) -> dict[str, Any]:
    return {
        "index": index,
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }


class ToolCallReader:
    """Reads a job's text as it streams in (``feed``, then ``finish``) into chat deltas: each a
    ``{"content": ...}`` or a ``{"tool_calls": [...]}`` delta as OpenAI streams them."""

    def __init__(self, plan: ToolPlan, job_id: str) -> None:
        self.plan = plan
        self._job_id = job_id
        self._buffer = ""
        self._in_call = False
        self._blank = ""  # whitespace held back until text follows it (calls between or not)
        self._said = False  # some content went out: whitespace is the answer's leading no more
        self.calls = 0  # calls made so far
        self._required = RequiredCalls()  # tool_choice required: its list of calls, read as it comes

    def _next_call(self, name: str, arguments: str) -> dict[str, Any]:
        index = self.calls
        self.calls += 1
        return {"tool_calls": [_call(f"call_{self._job_id}_{index}", index, name, arguments)]}

    def _more_arguments(self, text: str) -> dict[str, Any]:
        """The last call's arguments, streamed on."""
        return {"tool_calls": [{"index": self.calls - 1, "function": {"arguments": text}}]}

    def _content(self, text: str) -> list[dict[str, Any]]:
        """Text as a content delta. Whitespace is held back until text follows it, and then goes
        before that text, calls between or not ("Hello\n<call>world" is "Hello\nworld"); the
        answer's leading whitespace is no content, nor its trailing whitespace once it made a
        call (the newlines around calls). So the content keeps its line breaks however its deltas
        were cut (a delta of only a newline is common), and streamed it is the whole answer's."""
        text = self._blank + text
        body = text.rstrip()
        self._blank = text[len(body) :]
        if not self._said:
            body = body.lstrip()
        if not body:
            return []
        self._said = True
        return [{"content": body}]

    def _end(self, deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The last deltas, with the whitespace held at the end when the answer made no call."""
        blank, self._blank = self._blank, ""
        return [*deltas, {"content": blank}] if blank and not self.calls else deltas

    def feed(self, text: str) -> list[dict[str, Any]]:
        mode = self.plan.mode
        if not text:
            return []
        if mode == "off":
            return [{"content": text}]
        if mode == "named":
            if self.calls == 0:
                assert self.plan.function is not None
                return [self._next_call(self.plan.function, text)]
            return [self._more_arguments(text)]
        if mode == "required":
            return self._from_required(self._required.feed(text))
        self._buffer += text
        return self._auto()

    def _auto(self) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        while True:
            if self._in_call:
                end = self._buffer.find(CLOSE)
                if end < 0:
                    return deltas
                block, self._buffer = self._buffer[:end], self._buffer[end + len(CLOSE) :]
                self._in_call = False
                deltas += self._block(block)
                continue
            start = self._buffer.find(OPEN)
            if start >= 0:
                deltas += self._content(self._buffer[:start])
                self._buffer, self._in_call = self._buffer[start + len(OPEN) :], True
                continue
            keep = next((n for n in range(len(OPEN) - 1, 0, -1) if self._buffer.endswith(OPEN[:n])), 0)
            ready, self._buffer = (
                self._buffer[: len(self._buffer) - keep],
                self._buffer[len(self._buffer) - keep :],
            )
            return deltas + self._content(ready)

    def _block(self, block: str) -> list[dict[str, Any]]:
        parsed = hermes_call(block.strip())
        if parsed is None:  # not a call after all: the model's text, as it wrote it
            return self._content(OPEN + block + CLOSE)
        return [self._next_call(*parsed)]

    def finish(self, cut: bool = False) -> list[dict[str, Any]]:
        """What the text's end releases: held-back text, an unclosed call, a required call whose
        name is whole (``cut``: the answer ended at its length limit, and a call it had begun is a
        call)."""
        rest, self._buffer = self._buffer, ""
        if self.plan.mode == "required":
            return self._end(self._from_required(self._required.finish(cut)))
        if self._in_call:  # the answer ended inside a call: a call once its name is whole
            self._in_call = False
            if (parsed := cut_call(rest)) is not None:
                return self._end([self._next_call(*parsed)])
            # Cut before its name: no call, and its markup is no content; else the model's text.
            return self._end([] if cut else self._content(OPEN + rest))
        if cut and rest.strip() and OPEN.startswith(rest.strip()):  # a call's first characters
            rest = ""
        return self._end(self._content(rest))

    def _from_required(self, events: list[Event]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, Call):
                deltas.append(self._next_call(event.name, ""))
            elif isinstance(event, Arguments):
                deltas.append(self._more_arguments(event.text))
            else:
                deltas += self._content(event.text)
        return deltas


def cut_short(finish_reason: str | None) -> bool:
    """Whether an answer ended at a limit (its length, or its time, which OpenAI's finish
    reasons report as ``length``): a forced call it had begun is a call."""
    return finish_reason in ("length", "timeout")


def read_whole(
    plan: ToolPlan, job_id: str, text: str, cut: bool = False
) -> tuple[str | None, list[dict[str, Any]]]:
    """A whole answer's content (None when it is only calls) and its tool calls (``cut``: it
    ended at its length limit)."""
    reader = ToolCallReader(plan, job_id)
    deltas = reader.feed(text) + reader.finish(cut)
    content = "".join(d.get("content", "") for d in deltas)
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        for call in delta.get("tool_calls", []):
            if "id" in call:
                calls.append({k: v for k, v in call.items() if k != "index"})
            else:  # a named call's arguments, streamed on
                calls[-1]["function"]["arguments"] += call["function"]["arguments"]
    if plan.mode == "auto" and calls:
        content = content.strip()
    return (content or None) if calls else content, calls
