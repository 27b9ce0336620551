"""The front's JSON Schema check against the grammar compiler it speaks for: each keyword it
refuses is one xgrammar (the workers' compiler, both engines) compiles but does not enforce (an
instance that breaks it is accepted whole), and each near miss it lets through is enforced. An
xgrammar that starts enforcing a refused keyword fails the first test: then allow it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from api.errors import ApiError
from api.tool_calls import plan_tools
from shared.schemas import ToolDefinition
from shared.schemas.json_schema_check import schema_problem

OBJECT_AB = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}}


@pytest.fixture(scope="module")
def compiler(tiny_model: Path) -> Any:
    import xgrammar
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=len(tokenizer))
    return xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)


class Written(str):
    """JSON text as the grammar may write it, where no Python value shows it (a key twice)."""


def accepts(compiler: Any, schema: dict[str, Any], instance: Any) -> bool:
    """Whether the grammar of ``schema`` takes ``instance`` (as the grammar writes JSON) whole."""
    import xgrammar

    matcher = xgrammar.GrammarMatcher(compiler.compile_json_schema(json.dumps(schema), any_whitespace=False))
    text = instance if isinstance(instance, Written) else json.dumps(instance)
    return bool(matcher.accept_string(text)) and bool(matcher.is_completed())


@pytest.mark.parametrize(
    ("schema", "breaks_it", "says"),
    [
        ({"type": "integer", "not": {"const": 1}}, 1, "'not'"),
        ({**OBJECT_AB, "if": {"required": ["a"]}, "then": {"required": ["b"]}}, {"a": 1}, "'if'"),
        (
            {"allOf": [{**OBJECT_AB, "required": ["a"]}, {**OBJECT_AB, "required": ["b"]}]},
            {"a": 1},
            "'allOf'",
        ),
        ({"type": "array", "items": {"type": "integer"}, "contains": {"const": 4}}, [1], "'contains'"),
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1], "'uniqueItems'"),
        ({"type": "number", "multipleOf": 0.5}, 0.3, "'multipleOf'"),
        ({**OBJECT_AB, "dependentRequired": {"a": ["b"]}}, {"a": 1}, "'dependentRequired'"),
        ({**OBJECT_AB, "dependentSchemas": {"a": {"required": ["b"]}}}, {"a": 1}, "'dependentSchemas'"),
        ({**OBJECT_AB, "dependencies": {"a": ["b"]}}, {"a": 1}, "'dependencies'"),
        ({"type": "string", "pattern": "^a+$", "maxLength": 2}, "aaaa", "'maxLength' beside a 'pattern'"),
        ({"type": "string", "format": "email", "maxLength": 6}, "abcdef@g.com", "'maxLength' beside format"),
        # A format the grammar does not know (pydantic's IPvAnyAddress, SecretStr, Path): any text.
        ({"type": "string", "format": "ipvanyaddress"}, "not an address", "'format' 'ipvanyaddress'"),
        ({"$ref": "https://example.com/integer.json"}, "anything", "points outside the schema"),
        ({"$defs": {"X": {"$anchor": "x", "type": "integer"}}, "$ref": "#x"}, "s", "names an anchor"),
        (
            {"$defs": {"X": {"type": "integer"}}, "$ref": "#/$defs/X", "maximum": 3},
            5,
            "'maximum' beside '$ref'",
        ),
        (
            {**OBJECT_AB, "anyOf": [{"required": ["a"]}, {"required": ["b"]}]},
            {"a": "s"},
            "'type' beside 'anyOf'",
        ),
        (
            {"properties": {"a": {"type": "integer"}}, "oneOf": [{"required": ["a"]}]},
            {"a": "s"},
            "beside 'oneOf'",
        ),
        ({**OBJECT_AB, "allOf": [{"required": ["a"]}]}, {"a": "s"}, "'type' beside 'allOf'"),
        (
            {"$defs": {"X": {"type": "integer"}}, "$ref": "#/$defs/X", "enum": [1, 2]},
            5,
            "'enum' beside '$ref'",
        ),
        (
            {"$defs": {"X": {"type": "integer"}}, "$ref": "#/$defs/X", "allOf": [{"minimum": 5}]},
            1,
            "'allOf' beside '$ref'",
        ),
        ({"anyOf": [{"type": "integer"}], "oneOf": [{"minimum": 5}]}, 1, "'oneOf' beside 'anyOf'"),
        ({"type": "integer", "$dynamicRef": "#meta", "$defs": {"m": {"minimum": 5}}}, 1, "'$dynamicRef'"),
        ({"$recursiveRef": "#/$defs/X", "$defs": {"X": {"type": "integer"}}}, "s", "'$recursiveRef'"),
        ({"type": "string", "pattern": "^a+$", "minLength": 3}, "a", "'minLength' beside a 'pattern'"),
        # A lookahead is left out of the pattern's grammar (xgrammar logs that it ignores it).
        ({"type": "string", "pattern": "^(?=z)[a-y]$"}, "d", "a lookahead"),
        ({"type": "string", "pattern": "^(?=.*[0-9])[a-z0-9]{4}$"}, "abcd", "a lookahead"),
        (
            {"type": "string", "pattern": "^(?!.*b)[ab]{3}$"},
            "bab",
            "a lookahead ('(?=' or '(?!') in the 'pattern'",
        ),
        (
            {"type": "object", "patternProperties": {"^(?!b)[a-z]$": {"type": "integer"}}},
            {"b": 1},
            "in the 'patternProperties'",
        ),
        # A required name that properties do not declare: left out, or the object closed to {}.
        ({"type": "object", "required": ["a"]}, {}, "'required' name 'a' outside 'properties'"),
        ({"required": ["a"]}, 3, "'required' name 'a'"),
        (
            {"type": "object", "additionalProperties": {"type": "boolean"}, "required": ["a"]},
            {},
            "'required' name 'a'",
        ),
        ({**OBJECT_AB, "required": ["c"], "additionalProperties": False}, {"b": 1}, "'required' name 'c'"),
        ({"type": "object", "patternProperties": {"^a$": {"type": "integer"}}, "required": ["a"]}, {}, "'a'"),
        # Open keys may be written again and again: one property, however many entries.
        (
            {"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 2},
            Written('{"c": 5, "c": 7}'),
            "'minProperties' over the required names and one more",
        ),
        (
            {**OBJECT_AB, "required": ["a"], "patternProperties": {"^c$": {}}, "minProperties": 3},
            Written('{"a": 1, "c": 2, "c": 3}'),  # two properties
            "'minProperties'",
        ),
        (
            {"type": "object", "propertyNames": {"pattern": "^[a-c]$"}, "minProperties": 2},
            Written('{"a": 1, "a": 2}'),
            "'minProperties'",
        ),
    ],
)
def test_a_refused_keyword_is_one_the_grammar_does_not_enforce(
    compiler: Any, schema: dict[str, Any], breaks_it: Any, says: str
) -> None:
    problem = schema_problem(schema)
    assert problem is not None and says in problem, problem
    assert accepts(compiler, schema, breaks_it)  # not enforced: the refusal is not a false one


@pytest.mark.parametrize(
    ("schema", "breaks_it", "follows_it"),
    [
        ({"allOf": [{**OBJECT_AB, "required": ["a"]}]}, {"b": 1}, {"a": 1}),
        ({"type": "integer", "multipleOf": 5}, 3, 10),
        ({"type": "string", "pattern": "^a{1,2}$"}, "aaaa", "aa"),
        # "(?=" inside a character class, or after an escaped parenthesis, is no lookahead.
        ({"type": "string", "pattern": "^[(?=]$"}, "a", "("),
        ({"type": "string", "pattern": "^\\(?=$"}, "x", "(="),
        ({"type": "string", "format": "email"}, "nope", "a@b.co"),
        ({"$defs": {"A B": {"type": "integer"}}, "$ref": "#/$defs/A B"}, "s", 1),
        (
            {**OBJECT_AB, "properties": {"a": {"type": "integer"}, "b": {"$ref": "#/properties/a"}}},
            {"b": "s"},
            {"b": 2},
        ),
        ({"type": "integer", "description": None, "not": None}, "s", 1),  # null is absent
        ({"type": "object", "properties": {"not": {"type": "integer"}}}, {"not": "s"}, {"not": 1}),  # a name
        ({"type": ["integer", "null"], "multipleOf": 5}, 3, None),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None, "title": "X"}, "s", 1),
        ({"$defs": {"X": {"type": "integer"}}, "$ref": "#/$defs/X", "description": "d"}, "s", 1),
        ({"enum": [1, 2], "anyOf": [{"type": "integer"}, {"type": "string"}]}, 5, 1),
        # An annotation beside branches, and a type the branches (MCP's titled enum) or the
        # referenced schema already have.
        ({"anyOf": [{"type": "integer"}], "example": 3, "enumDescriptions": ["x"]}, "s", 1),
        ({"type": "string", "oneOf": [{"const": "red", "title": "Red"}, {"const": "blue"}]}, "green", "red"),
        (
            {"$defs": {"O": {**OBJECT_AB, "required": ["a"]}}, "$ref": "#/$defs/O", "type": "object"},
            {},
            {"a": 1},
        ),
        # Required names that are declared, and as many properties as they make, with open keys;
        # a required list on a type that is not an object says nothing.
        (
            {
                **OBJECT_AB,
                "required": ["a", "b"],
                "additionalProperties": {"type": "integer"},
                "minProperties": 2,
            },
            {"a": 1},
            {"a": 1, "b": 2, "c": 3},
        ),
        ({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1}, {}, {"c": 1}),
        (  # the first open key after the required ones is a new property
            {**OBJECT_AB, "required": ["a"], "additionalProperties": {"type": "integer"}, "minProperties": 2},
            Written('{"a": 1, "a": 2}'),
            {"a": 1, "c": 2},
        ),
        ({"type": "object", "patternProperties": {}, "properties": {}, "minProperties": 0}, {"a": 1}, {}),
        ({"type": "string", "required": ["a"]}, 1, "s"),
        (  # property names beside declared properties close the object
            {**OBJECT_AB, "required": ["a"], "propertyNames": {"pattern": "^[a-c]$"}, "minProperties": 2},
            {"a": 1, "c": 2},
            {"a": 1, "b": 2},
        ),
    ],
)
def test_what_it_lets_through_the_grammar_enforces(
    compiler: Any, schema: dict[str, Any], breaks_it: Any, follows_it: Any
) -> None:
    assert schema_problem(schema) is None
    assert not accepts(compiler, schema, breaks_it) and accepts(compiler, schema, follows_it)


def test_references_that_point_at_nothing_and_deep_nesting_are_refused_with_their_place() -> None:
    problem = schema_problem(
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/A%20B"}}, "$defs": {"A B": {}}}
    )
    assert problem == "'$ref' '#/$defs/A%20B' points at nothing in the schema (at #/properties/a)"
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(200):
        node["items"] = {}
        node = node["items"]
    assert "nested more than 64 deep" in (schema_problem(deep) or "")
    assert schema_problem({"enum": [{"not": 1}], "const": {"$ref": "elsewhere"}}) is None  # data, not schema
    # A malformed keyword is the worker's compiler's to name (not a 500 here).
    assert schema_problem({"type": "string", "minLength": 2, "format": ["not", "a", "name"]}) is None
    many = {"type": "object", "properties": {f"p{i}": {} for i in range(6000)}}
    assert schema_problem(many) == "more than 5000 schemas in one request"
    assert schema_problem({"type": [{"a": 1}], "anyOf": [{}], "$ref": "#/anyOf/²"}) is not None  # no 500


def test_an_empty_enum_is_refused_before_a_job_exists(compiler: Any) -> None:
    """No value follows ``enum: []``: the grammar compiler refuses it in the worker, where a
    streamed request had already opened with a 200 and got an error event."""
    empty = {"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]}
    assert schema_problem(empty) == "'enum' lists no value: nothing can follow it (at #/properties/a)"
    with pytest.raises(RuntimeError):
        compiler.compile_json_schema(json.dumps(empty), any_whitespace=False)


def test_the_forced_functions_of_one_request_share_one_limit() -> None:
    """Many large functions are no way around the limit: a request's forced functions share it."""
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(2000)}}
    tools = [
        ToolDefinition.model_validate({"type": "function", "function": {"name": f"f{i}", "parameters": wide}})
        for i in range(3)
    ]
    with pytest.raises(ApiError) as refused:
        plan_tools(tools, "required", None)
    assert refused.value.param == "tools.2.function.parameters"
    assert "more than 5000 schemas in one request" in refused.value.message


def test_a_forced_call_finds_its_functions_nested_models(compiler: Any) -> None:
    """A function's '#/$defs/…' references still point into it once it sits in the combined
    schema of a required call: the call follows the nested model."""
    person = {
        "type": "object",
        "properties": {
            "home": {"$ref": "#/$defs/Address"},
            "next": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
        },
        "required": ["home", "next"],
        "additionalProperties": False,
        "$defs": {
            "Address": {"type": "object", "properties": {"zip": {"type": "integer"}}, "required": ["zip"]}
        },
    }
    tool = ToolDefinition.model_validate(
        {"type": "function", "function": {"name": "person", "parameters": person}}
    )
    schema = plan_tools([tool], "required", None).json_schema
    assert schema is not None and schema_problem(schema) is None
    call = {"name": "person", "arguments": {"home": {"zip": 1}, "next": {"home": {"zip": 2}, "next": None}}}
    assert accepts(compiler, schema, [call])
    call["arguments"]["home"] = {"zip": "s"}  # type: ignore[index]
    assert not accepts(compiler, schema, [call])


def test_patterns_that_repeat_too_much_are_refused_and_common_ones_are_enforced(compiler: Any) -> None:
    """A counted repetition is written out by the grammar compiler, whose time grows with its
    square (``^a{24000}$``: 45 s of a worker's slot, from a body of 270 bytes): a pattern may
    come to 1,024 positions, nested repetitions multiplied, and a schema's patterns to 16,384
    (a schema of many UUID fields, each pattern cheap, is taken)."""

    def of(pattern: str) -> dict[str, Any]:
        return {
            "type": "object",
            "properties": {"a": {"type": "string", "pattern": pattern}},
            "required": ["a"],
        }

    huge = "^a{" + "9" * 5000 + "}$"  # more digits than Python reads into an int
    bombs = ("^a{24000}$", "^((a{100}){100})$", "^(ab|[cd]){513}$", "^x{1024,}$", "^.{0,4000}$", huge)
    # What {0} repeats is compiled all the same: it takes nothing off the count.
    for bomb in (*bombs, "^a{24000}b{0}$", "^a{8000}(b{4000}){0}$", "(" * 30000 + "a"):
        problem = schema_problem(of(bomb)) or ""
        assert "repeats too much for constrained decoding" in problem, bomb
        assert problem.endswith("(at #/properties/a)"), problem
    named = {"type": "object", "patternProperties": {"^k{9000}$": {"type": "integer"}}}
    assert "the 'patternProperties' '^k{9000}$' repeats too much" in (schema_problem(named) or "")
    uuid = "^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    ids = {
        "type": "object",
        "properties": {f"id{i}": {"type": "string", "pattern": uuid} for i in range(300)},
    }
    assert schema_problem(ids) is None  # 300 UUID fields: 10,800 positions (0.12 s to compile)
    many = {"type": "object", "properties": {f"p{i}": of("^a{1000}$")["properties"]["a"] for i in range(17)}}
    problem = schema_problem(many) or ""
    assert "come to more than 16384 characters" in problem and "(at #/properties/p16)" in problem

    for pattern, follows, breaks in (
        (uuid, "123e4567-e89b-12d3-a456-426614174000", "123e4567-e89b-12d3-a456-42661417400"),
        (r"^\d{4}-\d{2}-\d{2}$", "2026-12-08", "2026-12-8"),
        ("^(ab){2,3}$", "ababab", "abababab"),
        ("^a{1024}$", "a" * 1024, "a" * 1023),  # at the limit: taken
    ):
        assert schema_problem(of(pattern)) is None, pattern
        assert accepts(compiler, of(pattern), {"a": follows}) and not accepts(
            compiler, of(pattern), {"a": breaks}
        )


def test_the_forced_functions_of_one_request_share_one_pattern_limit() -> None:
    repeated = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^a{1000}$"}}}
    tools = [
        ToolDefinition.model_validate(
            {"type": "function", "function": {"name": f"f{i}", "parameters": repeated}}
        )
        for i in range(17)
    ]
    with pytest.raises(ApiError) as refused:
        plan_tools(tools, "required", None)
    assert refused.value.param == "tools.16.function.parameters"
    assert "come to more than 16384 characters" in refused.value.message
    digits = {"type": "object", "properties": {"s": {"type": "string", "pattern": "^a{" + "1" * 5000 + "}$"}}}
    one = [
        ToolDefinition.model_validate({"type": "function", "function": {"name": "f", "parameters": digits}})
    ]
    with pytest.raises(ApiError) as refused:  # a 400, not the int conversion's ValueError (a 500)
        plan_tools(one, "required", None)
    assert refused.value.status == 400 and "repeats too much" in refused.value.message
