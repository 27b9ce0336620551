"""Reads the answer of ``tool_choice: "required"`` as it streams in: the JSON list of calls its
grammar makes the model write, ``[{"name": "...", "arguments": {...}}, ...]``.

Each call comes out as soon as its name is whole (``Call``), then its arguments' JSON text as
it arrives (``Arguments``), as OpenAI streams calls; so a client sees a call begin while the
model is still writing it, not the whole list at the answer's end.

An answer that is no list of calls (no grammar held it) is the model's text (``Content``): all
of it when no call has come out yet, else what follows the calls, so nothing is dropped. A
call begun when the answer ends stands with its arguments as far as they came (its length cut
it, as OpenAI answers a call the length cut; or the client's stop sequence did); cut before its
name is whole, it is no call.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

WHITESPACE = " \t\r\n"


@dataclass(frozen=True)
class Call:
    name: str


@dataclass(frozen=True)
class Arguments:
    text: str


@dataclass(frozen=True)
class Content:
    text: str


Event = Call | Arguments | Content
Phase = Literal["start", "item", "header", "arguments", "close", "end", "text"]
# A call's beginning, as its grammar writes it: {"name": <string>, "arguments": <value>
HEADER: tuple[str, ...] = ("{", '"name"', ":", "<name>", ",", '"arguments"', ":")


def _header(text: str) -> tuple[Literal["whole", "begun", "wrong"], int, str | None]:
    """How far ``text`` holds a call's beginning (``HEADER``, whitespace between its parts):
    ``whole`` (and where it ends), ``begun`` (it may still be one), or ``wrong``; with the
    name's JSON string once it is whole."""
    at, name = 0, None
    for part in HEADER:
        while at < len(text) and text[at] in WHITESPACE:
            at += 1
        if at >= len(text):
            return "begun", at, name
        if part == "<name>":
            end = _string_end(text, at)
            if end is None:
                return ("begun" if text[at] == '"' else "wrong"), at, None
            name, at = text[at:end], end
            continue
        given = text[at : at + len(part)]
        if not part.startswith(given):
            return "wrong", at, name
        if len(given) < len(part):
            return "begun", at, name
        at += len(part)
    return "whole", at, name


def _string_end(text: str, at: int) -> int | None:
    """Where the JSON string that begins at ``at`` ends (just past its quote), or None."""
    if text[at] != '"':
        return None
    escaped = False
    for index in range(at + 1, len(text)):
        char = text[index]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            return index + 1
    return None


def _name(literal: str | None) -> str | None:
    """The name a JSON string literal holds, or None if JSON cannot read it."""
    if literal is None:
        return None
    try:
        value = json.loads(literal)
    except ValueError:
        return None
    return value if isinstance(value, str) else None


class _ValueEnd:
    """Finds where one JSON value ends, fed piece by piece (leading whitespace skipped)."""

    def __init__(self) -> None:
        self._kind: Literal["", "nested", "string", "scalar"] = ""
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def scan(self, text: str) -> tuple[int, int, bool]:
        """(where the value's text in ``text`` begins, where it ends, whether the value ended)."""
        begin = 0
        for index, char in enumerate(text):
            if not self._kind:
                if char in WHITESPACE:
                    begin = index + 1
                    continue
                self._kind = "nested" if char in "{[" else "string" if char == '"' else "scalar"
                if self._kind == "scalar":
                    continue
                self._in_string = self._kind == "string"
                self._depth = 1 if self._kind == "nested" else 0
                continue
            if self._kind == "scalar":
                if char in WHITESPACE + ",}]":
                    return begin, index, True
                continue
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    if self._kind == "string":
                        return begin, index + 1, True
                continue
            if char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return begin, index + 1, True
        return begin, len(text), False


class RequiredCalls:
    """Feed it the answer's text (``feed``), then say it ended (``finish``); each gives events."""

    def __init__(self) -> None:
        self._phase: Phase = "start"
        self._rest = ""  # fed, not yet read
        self._seen = ""  # all that was fed, until a call comes out (the text, if it is none)
        self._calls = 0
        self._value = _ValueEnd()

    def feed(self, text: str) -> list[Event]:
        if self._phase == "text":
            return [Content(text)] if text else []
        if not self._calls:
            self._seen += text
        self._rest += text
        events: list[Event] = []
        while self._step(events):
            pass
        return events

    def finish(self, cut: bool = False) -> list[Event]:
        """What the end releases: a call whose name is whole but whose arguments had not begun,
        when the length cut it."""
        if self._phase == "header" and cut:
            state, _, literal = _header(self._rest)
            name = _name(literal)
            if state == "begun" and name is not None:
                self._calls += 1
                return [Call(name)]
        return []

    def _skip_blank(self) -> bool:
        """Leading whitespace read; whether anything else is left."""
        self._rest = self._rest.lstrip(WHITESPACE)
        return bool(self._rest)

    def _step(self, events: list[Event]) -> bool:
        """Read what the phase can; whether to go on."""
        phase = self._phase
        if phase == "arguments":
            begin, end, ended = self._value.scan(self._rest)
            if end > begin:
                events.append(Arguments(self._rest[begin:end]))
            self._rest = self._rest[end:]
            if ended:
                self._phase = "close"
            return ended
        if phase == "header":
            state, end, literal = _header(self._rest)
            name = _name(literal) if state == "whole" else None
            if state == "begun":
                return False
            if name is None:
                return self._not_calls(events)
            self._calls += 1
            self._seen = ""
            events.append(Call(name))
            self._rest, self._phase, self._value = self._rest[end:], "arguments", _ValueEnd()
            return True
        if not self._skip_blank():
            return False
        first = self._rest[0]
        if phase == "start" and first == "[":
            self._rest, self._phase = self._rest[1:], "item"
        elif phase == "item" and first == ",":
            self._rest = self._rest[1:]
        elif phase == "item" and first == "]":
            self._rest, self._phase = self._rest[1:], "end"
        elif phase == "item" and first == "{":
            self._phase = "header"
        elif phase == "close" and first == "}":
            self._rest, self._phase = self._rest[1:], "item"
        else:
            return self._not_calls(events)
        return True

    def _not_calls(self, events: list[Event]) -> bool:
        """The text is no (further) list of calls: it is content from here on (all of it, when
        no call came out)."""
        text = self._rest if self._calls else self._seen
        self._phase, self._rest, self._seen = "text", "", ""
        if text:
            events.append(Content(text))
        return False
