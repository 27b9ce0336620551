"""How large a JSON Schema ``pattern`` grows once its repetitions are written out.

The workers' grammar compiler (xgrammar) turns a counted repetition into that many copies of
what it repeats, and its time grows with the square of the result: ``^a{4000}$`` took 0.7 s
to compile here, ``^a{24000}$`` 45 s, and ``((a{1000}){1000})`` would be a million copies,
while the job held a worker's slot. The front counts the copies first, so that a request's
patterns (a few hundred characters of body) cannot cost minutes of a worker.

The count walks the text once, with a stack of groups, and follows ECMA-262's syntax (which
JSON Schema's patterns use): an escape and a character class are one position, a group is the
sum of its alternatives, ``{m}`` is m copies, ``{m,n}`` n, ``{m,}`` m + 1, ``+`` 2, ``*``,
``?`` and ``{0}`` 1 (the compiler builds what ``{0}`` repeats all the same). A quantifier binds
to the atom before it, and a second one multiplies again. The count never goes down as it reads
on, so it stops as soon as it passes ``cap``; it errs high, never low.
"""

from __future__ import annotations

import re

_COUNTED = re.compile(r"\{(\d+)(,(\d*))?\}")
_BRACED_ESCAPES = frozenset("upPk")  # \u{…}, \p{…}, \P{…}, \k<…> (its name: one position)
_GROUP_OPENERS = ("(?:", "(?=", "(?!", "(?<=", "(?<!")  # no position of their own
# Positions of a pattern, its repetitions written out: a pattern compiles in a time that grows
# with their square (^a{4000}$ 0.7 s here, ^.{0,4000}$ 5.3 s, ^a{24000}$ 45 s; a tokenizer of
# 575 tokens or of 150,000 alike), and a schema's patterns in the sum of theirs (1,000 UUID
# patterns, 36,000 positions: 0.7 s).
MAX_REGEX_POSITIONS = 1024  # one pattern's (^.{0,1000}$: about 0.35 s)
MAX_SCHEMA_REGEX_POSITIONS = 16384  # a schema's patterns' together (a call's functions share it)
MAX_CHARACTERS = 20_000  # a longer pattern is refused unread (reading one of 1 MB took a second)
_MANY = 10**9  # a count of more digits than this has (Python reads at most 4,300 of them)


def _number(digits: str) -> int:
    return int(digits) if len(digits) < 10 else _MANY


def _copies(match: re.Match[str]) -> int:
    least = _number(match.group(1))
    if match.group(2) is None:
        return max(least, 1)
    most = match.group(3)
    return max(_number(most) if most else least + 1, 1)


def _group_body(regex: str, at: int) -> int:
    """Where the body of the group that opens at ``regex[at] == '('`` starts (after ``?:``, a
    lookaround's, or a name's ``?<name>`` / ``?P<name>``)."""
    for opener in _GROUP_OPENERS:
        if regex.startswith(opener, at):
            return at + len(opener)
    if regex.startswith(("(?<", "(?P<"), at):
        close = regex.find(">", at)
        return close + 1 if close != -1 else len(regex)
    return at + 1


def _escape_end(regex: str, at: int) -> int:
    """The index after the escape that starts at ``regex[at] == '\\'``."""
    after = at + 2
    if regex[at + 1 : at + 2] in _BRACED_ESCAPES and after < len(regex) and regex[after] in "{<":
        close = regex.find("}" if regex[after] == "{" else ">", after)
        return close + 1 if close != -1 else len(regex)
    return after


def _class_end(regex: str, at: int) -> int:
    """The index after the character class that starts at ``regex[at] == '['``."""
    at += 1
    while at < len(regex):
        if regex[at] == "\\":
            at += 2
            continue
        if regex[at] == "]":
            return at + 1
        at += 1
    return at


def expanded_size(regex: str, cap: int) -> int:
    """Positions ``regex`` has with its repetitions written out (at most ``cap + 1``; a pattern
    longer than ``MAX_CHARACTERS`` counts as more, unread)."""
    if len(regex) > MAX_CHARACTERS:
        return cap + 1
    # A frame per open group: [its finished alternatives, the current one, the last atom's size]
    frames: list[list[int]] = [[0, 0, 0]]
    at = 0
    while at < len(regex):
        char, frame = regex[at], frames[-1]
        if frame[0] + frame[1] > cap:  # the whole is at least as large (each group's count was
            return cap + 1  # checked while it was the innermost; none goes down)
        quantifier = _COUNTED.match(regex, at) if char == "{" else None
        if quantifier is not None or char in "*+?":
            copies = _copies(quantifier) if quantifier is not None else (2 if char == "+" else 1)
            grown = min(cap + 1, frame[2] * copies)
            frame[1] = min(cap + 1, frame[1] - frame[2] + grown)
            frame[2] = grown
            at = quantifier.end() if quantifier is not None else at + 1
            continue
        if char == "(":
            frames.append([0, 0, 0])
            at = _group_body(regex, at)
            continue
        if char == ")" and len(frames) > 1:
            done = frames.pop()
            size = min(cap + 1, done[0] + done[1])
            parent = frames[-1]
            parent[1], parent[2] = min(cap + 1, parent[1] + size), size
            at += 1
            continue
        if char == "|":
            frame[0], frame[1], frame[2] = min(cap + 1, frame[0] + frame[1]), 0, 0
            at += 1
            continue
        if char in "^$":
            frame[2] = 0
            at += 1
            continue
        if char == "\\":
            at = _escape_end(regex, at)
        elif char == "[":
            at = _class_end(regex, at)
        else:
            at += 1
        frame[1], frame[2] = min(cap + 1, frame[1] + 1), 1
    total = 0
    for done in reversed(frames):  # groups left open: xgrammar refuses them anyway
        total = min(cap + 1, done[0] + done[1] + total)
    return total


def pattern_problem(named: str, regex: str, left: int) -> tuple[str | None, int]:
    """Why the pattern ``regex`` (``named`` so in a message) is too costly to compile, if it is,
    and the positions ``left`` to the schema's other patterns after it."""
    size = expanded_size(regex, MAX_REGEX_POSITIONS)
    if size > MAX_REGEX_POSITIONS:
        return (
            f"the {named} repeats too much for constrained decoding: a pattern may come to "
            f"{MAX_REGEX_POSITIONS} characters with its repetitions written out (its grammar's "
            "compile time grows with the square of that)"
        ), left
    if size > left:
        return (
            f"the patterns, up to the {named}, come to more than {MAX_SCHEMA_REGEX_POSITIONS} "
            "characters with their repetitions written out: more than constrained decoding takes "
            "in one schema"
        ), left - size
    return None, left - size
