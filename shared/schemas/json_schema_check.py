"""Whether the answer can be held to a JSON Schema a request brings (``response_format``,
Responses' ``text.format``, the parameters of a function a forced tool call calls), checked on
the front before a job exists.

Refused, each with the place in the schema:
- a ``$ref`` that points outside the schema (nothing is fetched), names an anchor (``#foo``),
  or points at nothing in it; ``$dynamicRef``;
- what the workers' grammar compiler (xgrammar 0.2, which both engines use) accepts but does
  not enforce, so that an answer would end ``stop`` without following it: ``not``,
  ``if``/``then``/``else``, ``allOf`` of two or more schemas, ``contains``, ``uniqueItems``,
  ``dependentRequired``/``dependentSchemas``/``dependencies``, ``multipleOf`` on a
  non-integer, a length limit beside a ``pattern`` or a checked ``format``, and any keyword
  but an annotation, ``enum`` or ``const`` beside a ``$ref``, ``anyOf``, ``oneOf`` or
  ``allOf`` (the grammar follows the reference or the branches alone). Each was found by
  compiling a schema with it and feeding the matcher an instance that breaks it;
  tests/test_json_schema_check.py does the same, so an xgrammar that changes shows up there.
- more than 64 schemas deep, or more than 5,000 in one.

Anything else is left to the worker's compiler, whose error names the same field: a malformed
schema, or a ``pattern`` its regular expressions cannot take. (``oneOf`` is followed as
``anyOf``: branches that overlap are not made exclusive.) The check walks only schema positions
(not ``enum``/``const`` values, not property names), treats a keyword set to null as absent,
and is linear in the schema's size, without recursion.
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
MAX_SCHEMAS = 5000  # schemas in one (about 13 ms to check; a body's worth of empty ones took 0.7 s)
NOT_ENFORCED = "is not enforced by the workers' grammar, so the answer would not be held to it"
# Beside these the grammar follows the reference or the branches alone: a sibling that is not
# an annotation (or an enum/const, which it does check) is dropped.
COMBINATORS = ("$ref", "anyOf", "oneOf", "allOf")
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "$id",
        "$schema",
        "$anchor",
        "$defs",
        "definitions",
        "discriminator",
        "contentEncoding",
        "contentMediaType",
        "nullable",
        "enum",
        "const",
    }
)
IGNORED = ("not", "if", "then", "else", "contains", "dependentRequired", "dependentSchemas", "dependencies")
IGNORED_REFS = ("$dynamicRef", "$recursiveRef")

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


Link = tuple["Link", Step] | None  # the way from the root to a schema, shared with its parent's


def schema_problem(schema: Any) -> str | None:
    """What keeps an answer from being held to ``schema``, or None. Linear in the schema's
    size: each schema waiting to be looked at holds a link to its parent's way, not a path."""
    if not isinstance(schema, dict):
        return None
    pending: list[tuple[int, dict[str, Any], Link]] = [(0, schema, None)]
    seen = 0
    while pending:
        depth, node, link = pending.pop()
        seen += 1
        if seen > MAX_SCHEMAS:
            return f"more than {MAX_SCHEMAS} schemas in one"
        if depth > MAX_DEPTH:
            return f"schemas nested more than {MAX_DEPTH} deep (at {_pointer(link)})"
        problem = _node_problem(schema, node)
        if problem is not None:
            return f"{problem} (at {_pointer(link)})"
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
        if not _resolves(root, ref):
            return f"'$ref' {_shown(ref)} points at nothing in the schema"
    for keyword in (*IGNORED, *IGNORED_REFS):
        if keyword in given:
            return f"'{keyword}' {NOT_ENFORCED}"
    if isinstance(given.get("allOf"), list) and len(given["allOf"]) > 1:
        return f"'allOf' of {len(given['allOf'])} schemas {NOT_ENFORCED} (one schema is: merge them)"
    combinator = next((key for key in COMBINATORS if key in given), None)
    if combinator is not None:
        beside = [key for key in given if key not in ANNOTATIONS and key not in COMBINATORS]
        beside = [key for key in beside if not key.startswith("x-")]
        if beside:
            return f"'{beside[0]}' beside '{combinator}' {NOT_ENFORCED} (put it inside)"
    if given.get("uniqueItems") is True:
        return f"'uniqueItems' {NOT_ENFORCED}"
    types = given.get("type")
    integers = types == "integer" or (isinstance(types, list) and set(types) <= {"integer", "null"})
    if "multipleOf" in given and not integers:
        return f"'multipleOf' on a type other than 'integer' {NOT_ENFORCED}"
    limits = [key for key in ("minLength", "maxLength") if key in given]
    form = given.get("format")
    checked_format = isinstance(form, str) and form in CHECKED_FORMATS
    if limits and ("pattern" in given or checked_format):
        near = "a 'pattern'" if "pattern" in given else f"format '{form}'"
        return f"'{limits[0]}' beside {near} {NOT_ENFORCED} (write the length into a pattern)"
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
