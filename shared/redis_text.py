"""Redis replies as text, whichever client read them (RQ's want bytes, the front's decode)."""

from __future__ import annotations

from typing import Any


def text(value: Any) -> str | None:
    """A string reply (bytes or str) as str; None stays None."""
    return value.decode() if isinstance(value, bytes) else (None if value is None else str(value))


def names(members: Any) -> list[str]:
    """Redis members (bytes or str) as str."""
    return [text(m) or "" for m in members]


def hash_fields(mapping: Any) -> dict[str, str]:
    """A hash reply (HGETALL: bytes or str keys and values) as str to str."""
    return {text(k) or "": text(v) or "" for k, v in mapping.items()}
