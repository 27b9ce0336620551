"""What a request's validation errors say: the field each is about (dotted, as the client named
it), and, of pydantic's complaints about one value, those worth showing."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError


def first_error(exc: ValidationError) -> tuple[str | None, str]:
    """The field (dotted) and the message of a pydantic error's first complaint."""
    first = relevant(exc.errors())[0]
    return where_at(first), str(first["msg"]).removeprefix("Value error, ")


# A check of the whole request names the field it is about first, in quotes ("'messages' must
# not be empty"): that is its param.
_NAMED_FIRST = re.compile(r"^(?:Value error, )?'([A-Za-z_][\w.]*)'")


def where_at(error: Any) -> str | None:
    """The field a complaint is about: its place, or for a whole-request check the field its
    message names first."""
    found = param_of(tuple(error.get("loc", ())))
    if found is None and (named := _NAMED_FIRST.match(str(error.get("msg", "")))) is not None:
        return named[1]
    return found


# Pydantic names the member of a union a complaint is about in its location ("stop",
# "function-after[_encodable(), str]"; a model's class, "NamedToolChoice"): not a field the
# client sent (fields and OpenAI's names are snake_case).
_MEMBER_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "bytes"}
_MODEL_TAG = re.compile(r"^[A-Z][A-Za-z0-9]*$")


def _member_tag(p: Any) -> bool:
    return isinstance(p, str) and (
        "[" in p or p.removeprefix("constrained-") in _MEMBER_TAGS or bool(_MODEL_TAG.match(p))
    )


def param_of(loc: tuple[Any, ...]) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header") and not _member_tag(p)]
    return ".".join(parts) if parts else None  # a key "" is a place too: named "", not None


def _inside_other_member(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Whether complaint place ``b`` lies inside another member of a union that ``a`` lies in:
    the member matched the value's shape, and something within it is wrong (a member that is a
    scalar, such as a literal, complains at its tag: it did not match the value's shape)."""
    shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return (
        shared < min(len(a), len(b))
        and _member_tag(a[shared])
        and _member_tag(b[shared])
        and len(b) > shared + 1
    )


def relevant(errors: Sequence[Any]) -> list[Any]:
    """The complaints worth showing: for a value a union took apart, the member that matched its
    shape says what is wrong (a lone surrogate inside a list of stop strings; a negative id in
    a prompt of token ids), not the members whose type it is not ("stop: Input should be a
    valid string"): a type complaint is left out where another complaint lies inside the same
    place, or in another member of a union it lies in. When every member's complaint is of
    type, they say it once ("Input should be a valid string, or a valid list")."""

    def where(e: Any) -> str:
        return param_of(tuple(e.get("loc", ()))) or ""

    def of_type(e: Any) -> bool:
        return str(e.get("type", "")).endswith("_type")

    inner = [e for e in errors if not of_type(e)]

    def outdone(e: Any) -> bool:
        at, loc = where(e), tuple(e.get("loc", ()))
        return of_type(e) and (
            any(
                where(v) == at
                or where(v).startswith(at + ".")
                or _inside_other_member(loc, tuple(v.get("loc", ())))
                for v in inner
            )
            # Every member's complaint of type, one from inside a member that took the value's
            # shape (a list of items, one with a null content): that one says where.
            or any(of_type(v) and _inside_other_member(loc, tuple(v.get("loc", ()))) for v in errors)
        )

    kept = [e for e in errors if not outdone(e)] or list(errors)
    merged: list[Any] = []
    for e in kept:
        before = merged[-1] if merged else None
        if before is not None and of_type(e) and of_type(before) and where(e) == where(before):
            also = str(e.get("msg", "")).removeprefix("Input should be ")
            said = str(before.get("msg", ""))
            if also not in said.removeprefix("Input should be ").split(", or "):
                merged[-1] = {**before, "msg": f"{said}, or {also}"}
        else:
            merged.append(e)
    return merged
