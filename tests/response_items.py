"""Reading the Responses API's items through the official SDK, whose types cover every kind of item."""

from __future__ import annotations

from openai.types.responses import ResponseItem


def item_text(item: ResponseItem) -> str:
    """An input item's text: the first part's of a message."""
    assert item.type == "message", item
    part = item.content[0]
    assert part.type in ("input_text", "output_text"), part
    return part.text
