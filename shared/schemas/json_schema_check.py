"""Whether the answer can be held to a JSON Schema a request brings (``response_format``,
Responses' ``text.format``, the parameters of a function a forced tool call calls), checked on
the front before a job exists.

Refused, each with the place in the schema:
- a ``$ref`` that points outside the schema (nothing is fetched), names an anchor (``#foo``),
  or points at nothing in it; ``$dynamicRef`` and ``$recursiveRef``;
- what the workers' grammar compiler (xgrammar 0.2, which both engines use) accepts but does
  not enforce, so that an answer would end ``stop`` without following it: ``not``,
  ``if``/``then``/``else``, ``allOf`` of two or more schemas, ``contains``, ``uniqueItems``,
  ``dependentRequired``/``dependentSchemas``/``dependencies``, ``multipleOf`` on a
  non-integer, a length limit beside a ``pattern`` or a checked ``format``, a ``required`` name
  that ``properties`` does not declare (the grammar leaves it out, or writes ``{}``), a
  lookahead (``(?=``, ``(?!``) in a ``pattern`` or a ``patternProperties`` name, a
  ``minProperties`` above the required names where other keys are open (the grammar may write
  one open key again and again: ``{"c": 1, "c": 2}`` is one property), and a constraint
  beside a ``$ref``, ``anyOf``, ``oneOf`` or ``allOf``, or two of these side by side (the
  grammar follows one reference or set of branches alone). An annotation passes, and so do an
  ``enum``/``const`` beside branches and a ``type`` the branches or the referenced schema
  already have. Each was found by compiling a schema with it and feeding the matcher an
  instance that breaks it; tests/test_json_schema_check.py does the same, so an xgrammar that
  changes shows up there.
- more than 64 schemas deep, or more than 5,000 in one request;
- a pattern whose repetitions, written out, come to more than 1,024 positions, or a schema's
  patterns to more than 16,384 together (a call's functions share the count;
  shared/schemas/regex_size.py: a pattern's compile time grows with the square of its own).

Anything else is left to the worker's compiler, whose error names the same field: a malformed
schema, or a ``pattern`` its regular expressions cannot take. (``oneOf`` is followed as
``anyOf``: branches that overlap are not made exclusive.) The check walks only schema positions
(not ``enum``/``const`` values, not property names), treats a keyword set to null as absent,
and is linear in the schema's size, breadth first, without recursion.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator

from shared.schemas.regex_size import MAX_SCHEMA_REGEX_POSITIONS, pattern_problem

# Keywords whose value is one schema, a list of schemas, or a map of names to schemas.
ONE_SCHEMA = frozenset(
    {
        "items",
        "additionalItems",
        "additionalProperties",
        "unevaluatedItems",
        "unevaluatedProperties",
        "propertyNames",
        "contains",
        "not",
        "if",
        "then",
        "else",
        "contentSchema",
    }
)
SCHEMA_LISTS = frozenset({"allOf", "anyOf", "oneOf", "prefixItems", "items"})
SCHEMA_MAPS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})

# Formats xgrammar 0.2 checks (a length limit beside one of these is dropped); others are notes.
CHECKED_FORMATS = frozenset(
    {
        "email",
        "date",
        "time",
        "date-time",
        "duration",
        "ipv4",
        "ipv6",
        "hostname",
        "uuid",
        "uri",
        "uri-reference",
        "uri-template",
        "json-pointer",
        "relative-json-pointer",
    }
)
MAX_DEPTH = 64  # schemas within schemas: deeper is refused (compilers recurse; models need far less)
MAX_SCHEMAS = 5000  # schemas in one request's checks (about 20 ms; a body of empty ones took 0.7 s)
NOT_ENFORCED = "is not enforced by the workers' grammar, so the answer would not be held to it"
# Beside a reference or branches the grammar follows them alone: a constraint beside them is
# dropped (an annotation, any keyword not listed here, says nothing the answer must follow).
COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")
CONSTRAINTS = frozenset(
    {
        "type",
        "enum",
        "const",
        "multipleOf",
        "maximum",
        "exclusiveMaximum",
        "minimum",
        "exclusiveMinimum",
        "maxLength",
        "minLength",
        "pattern",
        "format",
        "maxItems",
        "minItems",
        "uniqueItems",
        "maxContains",
        "minContains",
        "items",
        "prefixItems",
        "additionalItems",
        "unevaluatedItems",
        "maxProperties",
        "minProperties",
        "required",
        "properties",
        "patternProperties",
        "additionalProperties",
        "unevaluatedProperties",
        "propertyNames",
    }
)
IGNORED = ("not", "if", "then", "else", "contains", "dependentRequired", "dependentSchemas", "dependencies")
IGNORED_REFS = ("$dynamicRef", "$recursiveRef")
JSON_TYPES: dict[str, Any] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "null": type(None),
}

Step = tuple[str | int, ...]  # the keys from a schema to one directly inside it


def subschemas(node: dict[str, Any]) -> Iterator[tuple[Step, dict[str, Any]]]:
    """The schemas directly inside ``node``, each with the keys that lead to it."""
    for key, value in node.items():
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, schema in value.items():
                if isinstance(schema, dict):
                    yield (key, name), schema
        elif key in SCHEMA_LISTS and isinstance(value, list):
            for index, schema in enumerate(value):
                if isinstance(schema, dict):
                    yield (key, index), schema
        elif key in ONE_SCHEMA and isinstance(value, dict):
            yield (key,), value


def _children(node: dict[str, Any]) -> int:
    """How many schemas ``subschemas`` gives at most, counted without walking them."""
    count = 0
    for key, value in node.items():
        if (key in SCHEMA_MAPS and isinstance(value, dict)) or (
            key in SCHEMA_LISTS and isinstance(value, list)
        ):
            count += len(value)
        elif key in ONE_SCHEMA and isinstance(value, dict):
            count += 1
    return count


Link = tuple["Link", Step] | None  # the way from the root to a schema, shared with its parent's


class Budget:
    """The schemas one request may have checked, and their patterns' positions (the functions a
    forced call may call share it)."""

    def __init__(self, schemas: int = MAX_SCHEMAS, regex_positions: int = MAX_SCHEMA_REGEX_POSITIONS) -> None:
        self.left = schemas
        self.regex_positions = regex_positions


def schema_problem(schema: Any, budget: Budget | None = None) -> str | None:
    """What keeps an answer from being held to ``schema``, or None. Linear in the schema's
    size and breadth first (the problem named is the shallowest); each schema waiting to be
    looked at holds a link to its parent's way, not a path."""
    if not isinstance(schema, dict):
        return None
    budget = budget or Budget()
    budget.left -= 1
    pending: deque[tuple[int, dict[str, Any], Link]] = deque([(0, schema, None)])
    while pending:
        depth, node, link = pending.popleft()
        if depth > MAX_DEPTH:
            return f"schemas nested more than {MAX_DEPTH} deep (at {_pointer(link)})"
        problem = _node_problem(schema, node) or _regex_problem(node, budget)
        if problem is not None:
            return f"{problem} (at {_pointer(link)})"
        budget.left -= _children(node)
        if budget.left < 0:
            return f"more than {MAX_SCHEMAS} schemas in one request"
        pending.extend((depth + 1, inner, (link, step)) for step, inner in subschemas(node))
    return None


def _pointer(link: Link) -> str:
    steps: list[str] = []
    while link is not None:
        link, step = link
        steps[:0] = [_escaped(key) for key in step]
    shown = "#" + "".join(f"/{key if len(key) <= 40 else key[:40] + '…'}" for key in steps)
    return shown if len(shown) <= 160 else "…" + shown[-160:]


def _node_problem(root: dict[str, Any], node: dict[str, Any]) -> str | None:
    given = {key: value for key, value in node.items() if value is not None}
    ref = given.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#"):
            return f"'$ref' {_shown(ref)} points outside the schema; only '#/…' references are followed"
        if ref != "#" and not ref.startswith("#/"):
            return f"'$ref' {_shown(ref)} names an anchor; only '#/…' references are followed"
        if _target(root, ref) is None:
            return f"'$ref' {_shown(ref)} points at nothing in the schema"
    for keyword in (*IGNORED, *IGNORED_REFS):
        if keyword in given:
            return f"'{keyword}' {NOT_ENFORCED}"
    if isinstance(given.get("allOf"), list) and len(given["allOf"]) > 1:
        return f"'allOf' of {len(given['allOf'])} schemas {NOT_ENFORCED} (one schema is: merge them)"
    combinators = [key for key in COMBINATORS if key in given]
    if len(combinators) > 1:
        return f"'{combinators[1]}' beside '{combinators[0]}' {NOT_ENFORCED} (only one is followed)"
    if combinators:
        beside = [key for key in given if key in CONSTRAINTS and not _implied(root, key, given)]
        if beside:
            return f"'{beside[0]}' beside '{combinators[0]}' {NOT_ENFORCED} (put it inside)"
    if given.get("uniqueItems") is True:
        return f"'uniqueItems' {NOT_ENFORCED}"
    if given.get("enum") == []:  # no value can follow it (the grammar compiler refuses it too)
        return "'enum' lists no value: nothing can follow it"
    types = given.get("type")
    listed = types if isinstance(types, list) else [types]
    integers = all(t in ("integer", "null") for t in listed) and "integer" in listed
    if "multipleOf" in given and not integers:
        return f"'multipleOf' on a type other than 'integer' {NOT_ENFORCED}"
    problem = _object_problem(given)
    if problem is not None:
        return problem
    limits = [key for key in ("minLength", "maxLength") if key in given]
    form = given.get("format")
    checked_format = isinstance(form, str) and form in CHECKED_FORMATS
    if limits and ("pattern" in given or checked_format):
        near = "a 'pattern'" if "pattern" in given else f"format '{form}'"
        return f"'{limits[0]}' beside {near} {NOT_ENFORCED} (write the length into a pattern)"
    if isinstance(form, str) and not checked_format and "string" in listed:
        known = ", ".join(sorted(CHECKED_FORMATS))
        return f"'format' {_shown(form)} {NOT_ENFORCED} (the grammar checks these: {known})"
    for keyword, regex in _regexes(given):
        if _has_lookahead(regex):
            return f"a lookahead ('(?=' or '(?!') in the '{keyword}' {_shown(regex)} {NOT_ENFORCED}"
    return None


def _regexes(given: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """The node's regular expressions: its ``pattern``, and its ``patternProperties``' names."""
    if isinstance(given.get("pattern"), str):
        yield "pattern", given["pattern"]
    if isinstance(given.get("patternProperties"), dict):
        yield from (("patternProperties", name) for name in given["patternProperties"])


def _regex_problem(node: dict[str, Any], budget: Budget) -> str | None:
    for keyword, regex in _regexes(node):
        problem, budget.regex_positions = pattern_problem(
            f"'{keyword}' {_shown(regex)}", regex, budget.regex_positions
        )
        if problem is not None:
            return problem
    return None


def _has_lookahead(regex: str) -> bool:
    """Whether ``regex`` asserts ahead (``(?=…)``, ``(?!…)``) outside a character class: xgrammar
    compiles such a pattern with the assertion left out (its log says so), so ``^(?=.*[0-9])…``
    would let an answer without a digit through."""
    at, in_class = 0, False
    while at < len(regex):
        char = regex[at]
        if char == "\\":
            at += 2
            continue
        if in_class:
            in_class = char != "]"
        elif char == "[":
            in_class = True
        elif regex.startswith(("(?=", "(?!"), at):
            return True
        at += 1
    return False


def _object_problem(given: dict[str, Any]) -> str | None:
    """What of an object's ``required`` and ``minProperties`` the grammar does not enforce. Its
    keys beyond the declared properties are open (xgrammar's strict mode, which both engines use,
    closes them otherwise) with additional or unevaluated properties that are not false, pattern
    properties, or property names where no property is declared."""
    types = given.get("type")
    if types is not None and "object" not in (types if isinstance(types, list) else [types]):
        return None
    declared = given.get("properties")
    declared = declared if isinstance(declared, dict) else {}
    required = given.get("required")
    names = {name for name in required if isinstance(name, str)} if isinstance(required, list) else set()
    missing = sorted(names - declared.keys())
    if missing:
        return f"'required' name {_shown(missing[0])} outside 'properties' {NOT_ENFORCED} (declare it there)"
    least = given.get("minProperties")
    open_keys = (
        any(
            key in given and given[key] is not False
            for key in ("additionalProperties", "unevaluatedProperties")
        )
        or bool(given.get("patternProperties"))
        or ("propertyNames" in given and not declared)  # beside declared properties it closes them
    )
    # Required names and declared properties are written once each, and the first open key is a
    # new one: the grammar holds minProperties up to the required names and one more.
    if open_keys and isinstance(least, int) and not isinstance(least, bool) and least > len(names) + 1:
        return (
            f"'minProperties' over the required names and one more, where other keys are open, "
            f"{NOT_ENFORCED} (the grammar may write one key again and again; require the keys by name)"
        )
    return None


def _implied(root: dict[str, Any], keyword: str, given: dict[str, Any]) -> bool:
    """Whether a constraint beside a reference or branches adds nothing the grammar drops: an
    ``enum``/``const`` beside branches (checked there, not beside a ``$ref``), or a ``type``
    that every branch has already (MCP's titled enum, ``{"type": "string", "oneOf": [{"const":
    "red"}, …]}``) or that the referenced schema has."""
    if keyword in ("enum", "const"):
        return "$ref" not in given
    kind = given.get("type")
    if keyword != "type" or not isinstance(kind, str):
        return False
    if "$ref" in given:
        target = _target(root, given["$ref"])
        return isinstance(target, dict) and target.get("type") == kind
    branches = next((given[key] for key in COMBINATORS if key in given), None)
    return isinstance(branches, list) and bool(branches) and all(_of_type(b, kind) for b in branches)


def _of_type(branch: Any, kind: str) -> bool:
    """Whether every value ``branch`` allows is of JSON type ``kind``."""
    if not isinstance(branch, dict):
        return False
    if branch.get("type") == kind:
        return True
    values = [branch["const"]] if "const" in branch else branch.get("enum")
    python = JSON_TYPES.get(kind)
    if not isinstance(values, list) or not values or python is None:
        return False
    return all(isinstance(v, python) and (kind == "boolean" or not isinstance(v, bool)) for v in values)


def _target(root: dict[str, Any], ref: str) -> Any:
    """What JSON pointer ``ref`` ('#/a/b', '~1' for '/', '~0' for '~') names in ``root`` (a
    schema: a dict or a bool), or None. Taken as it is: the grammar compiler does not undo
    percent-encoding either."""
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif (
            isinstance(node, list)
            and key.isascii()
            and key.isdigit()
            and len(key) < 10
            and int(key) < len(node)
        ):
            node = node[int(key)]
        else:
            return None
    return node if isinstance(node, dict | bool) else None


def _escaped(name: str | int) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")


def _shown(text: str) -> str:
    return repr(text) if len(text) <= 120 else repr(text[:120] + "…")


def checked_schema(schema: Any) -> Any:
    """``schema`` itself, or ValueError saying what keeps an answer from following it."""
    problem = schema_problem(schema)
    if problem is not None:
        raise ValueError(f"the answer cannot be held to this JSON Schema: {problem}")
    return schema


# A request field that holds a JSON Schema the answer is held to (front-side request models only).
UsableSchema = Annotated[dict[str, Any], AfterValidator(checked_schema)]
