"""Whether the answer can be held to a JSON Schema a request brings (``response_format``,
Responses' ``text.format``, a tool's ``parameters``), checked on the front before a job exists.

Two things are refused, each with the place in the schema:
- a ``$ref`` that points outside the schema (nothing is fetched) or at nothing in it;
- a keyword the workers' grammar compiler (xgrammar 0.2, on both engines) accepts but does not
  enforce, so that an answer would end ``stop`` without following it: ``not``, ``if``/``then``/
  ``else``, ``allOf`` of two or more schemas, ``contains`` (and its counts), ``uniqueItems``,
  ``dependentRequired``/``dependentSchemas``/``dependencies``, ``multipleOf`` on a non-integer,
  and a length limit beside a ``pattern`` or a checked ``format``. Each was found by compiling a
  schema with it and feeding the matcher an instance that breaks it (tests/test_json_schema_check.py
  does the same, so an xgrammar that changes shows up there).

Anything else is left to the worker's compiler, whose error names the same field: a malformed
schema, or a ``pattern`` its regular expressions cannot take. The check walks only schema
positions (not ``enum``/``const`` values, not property names), treats a keyword set to null as
absent, and is linear in the schema's size, iterative (no recursion limit), with no regular
expression compiled.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from pydantic import AfterValidator

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
NOT_ENFORCED = "is not enforced by the workers' grammar, so the answer would not be held to it"


def subschemas(node: dict[str, Any], at: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The schemas directly inside ``node`` (at JSON pointer ``at``), with their pointers."""
    for key, value in node.items():
        where = f"{at}/{_escaped(key)}"
        if key in SCHEMA_MAPS and isinstance(value, dict):
            for name, schema in value.items():
                if isinstance(schema, dict):
                    yield f"{where}/{_escaped(name)}", schema
        elif key in SCHEMA_LISTS and isinstance(value, list):
            for index, schema in enumerate(value):
                if isinstance(schema, dict):
                    yield f"{where}/{index}", schema
        elif key in ONE_SCHEMA and isinstance(value, dict):
            yield where, value


def schema_problem(schema: Any) -> str | None:
    """What keeps an answer from being held to ``schema``, or None."""
    if not isinstance(schema, dict):
        return None
    pending: list[tuple[int, str, dict[str, Any]]] = [(0, "#", schema)]
    while pending:
        depth, at, node = pending.pop()
        shown = at if len(at) <= 120 else at[:120] + "…"
        if depth > MAX_DEPTH:
            return f"schemas nested more than {MAX_DEPTH} deep (at {shown})"
        problem = _node_problem(schema, node)
        if problem is not None:
            return f"{problem} (at {shown})"
        pending.extend((depth + 1, where, inner) for where, inner in subschemas(node, at))
    return None


def _node_problem(root: dict[str, Any], node: dict[str, Any]) -> str | None:
    given = {key: value for key, value in node.items() if value is not None}
    ref = given.get("$ref")
    if isinstance(ref, str):
        if not ref.startswith("#"):
            return f"'$ref' {_shown(ref)} points outside the schema; only '#…' references are followed"
        if not _resolves(root, ref):
            return f"'$ref' {_shown(ref)} points at nothing in the schema"
    for keyword in ("not", "if", "then", "else", "contains", "minContains", "maxContains"):
        if keyword in given:
            return f"'{keyword}' {NOT_ENFORCED}"
    for keyword in ("dependentRequired", "dependentSchemas", "dependencies"):
        if keyword in given:
            return f"'{keyword}' {NOT_ENFORCED}"
    if isinstance(given.get("allOf"), list) and len(given["allOf"]) > 1:
        return f"'allOf' of {len(given['allOf'])} schemas {NOT_ENFORCED} (one schema is: merge them)"
    if given.get("uniqueItems") is True:
        return f"'uniqueItems' {NOT_ENFORCED}"
    if "multipleOf" in given and given.get("type") != "integer":
        return f"'multipleOf' on a type other than 'integer' {NOT_ENFORCED}"
    limits = [key for key in ("minLength", "maxLength") if key in given]
    if limits and ("pattern" in given or given.get("format") in CHECKED_FORMATS):
        beside = "a 'pattern'" if "pattern" in given else f"format '{given['format']}'"
        return f"'{limits[0]}' beside {beside} {NOT_ENFORCED} (write the length into a pattern)"
    return None


def _resolves(root: dict[str, Any], ref: str) -> bool:
    """Whether JSON pointer ``ref`` ('#/a/b', '~1' for '/', '~0' for '~') names a schema in
    ``root``, taken as it is: the grammar compiler does not undo percent-encoding either."""
    node: Any = root
    for part in ref[1:].split("/")[1:] if ref != "#" else []:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            return False
    return isinstance(node, dict | bool)


def _escaped(name: str) -> str:
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
