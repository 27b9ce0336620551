"""The input of a Responses API request: its items (messages with text parts, earlier
``function_call`` items and ``function_call_output`` items), the chat messages they make for
the job, and the items as ``GET /v1/responses/{id}/input_items`` lists them.

Function calls join the assistant turn before them (or make one), and a call's output is a
``tool`` turn answering it by ``call_id`` (named after the call's function when it is known), as
the chat route's messages carry them. Any other item or content type (images, files, item
references, reasoning) is a 400 naming it.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Tag, model_validator

from shared.schemas import ChatMessage, FunctionCall, Text, ToolCall

_FORBID = ConfigDict(extra="forbid")

ItemStatus = Literal["in_progress", "completed", "incomplete"]
ITEM_TYPES = ("message", "function_call", "function_call_output")


def said_nothing(value: Any, fields: dict[str, tuple[Any, ...]]) -> Any:
    """``value`` (a dict) without the OpenAI fields it gives with a value that asks for nothing
    (null, or the field's default): the SDK's ``model_dump()`` of an item or a tool writes
    them so (``"async": null``, ``"defer_loading": false``). Any other value of them is still
    refused, naming it."""
    if not isinstance(value, dict):
        return value
    return {k: v for k, v in value.items() if not any(v is nothing for nothing in fields.get(k, ("-",)))}


def item_type(value: Any, default: str | None = None) -> Any:
    """The ``type`` of an item or part, given as a dict or a model."""
    return value.get("type", default) if isinstance(value, dict) else getattr(value, "type", default)


class TextPart(BaseModel):
    """A text part of a message: ``input_text``, or ``output_text`` in an assistant turn sent back
    (its annotations and logprobs, which streamq never writes, are not given to the model)."""

    model_config = _FORBID

    type: Literal["input_text", "output_text"]
    text: Text
    annotations: list[Any] | None = None
    logprobs: list[Any] | None = None

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, value: Any) -> Any:
        if item_type(value) not in ("input_text", "output_text"):
            raise ValueError(
                f"content parts of type {item_type(value)!r} are not supported (only input_text, "
                "and output_text in an assistant message)"
            )
        # As the openai SDK dumps an input_text it listed (a cache breakpoint: refused if given).
        return said_nothing(value, {"prompt_cache_breakpoint": (None,)})


Content = Text | list[TextPart]


def _text(content: Content) -> str:
    return content if isinstance(content, str) else "\n".join(part.text for part in content)


class MessageItem(BaseModel):
    model_config = _FORBID

    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content
    id: str | None = None
    status: ItemStatus | None = None
    phase: Literal["commentary", "final_answer"] | None = None

    @model_validator(mode="after")
    def _output_from_the_assistant(self) -> MessageItem:
        """``output_text`` is what a model wrote: only an assistant turn has it (OpenAI's rule)."""
        parts = [] if isinstance(self.content, str) else self.content
        if self.role != "assistant" and any(part.type == "output_text" for part in parts):
            raise ValueError(
                f"a {self.role} message's content parts are input_text: output_text is an assistant message's"
            )
        return self


class FunctionCallItem(BaseModel):
    """A call the model made earlier (an assistant turn's tool call)."""

    model_config = _FORBID

    type: Literal["function_call"]
    call_id: Text
    name: Text
    arguments: Text
    id: str | None = None
    status: ItemStatus | None = None

    @model_validator(mode="before")
    @classmethod
    def _said_nothing(cls, value: Any) -> Any:
        # As the openai SDK dumps a call it returned or listed (``async_``: its Python name, unaliased).
        return said_nothing(
            value,
            {
                "async": (None, False),
                "async_": (None, False),
                "caller": (None,),
                "namespace": (None,),
                "created_by": (None,),
            },
        )


class FunctionCallOutputItem(BaseModel):
    """The result of a call, for the model (a ``tool`` turn)."""

    model_config = _FORBID

    type: Literal["function_call_output"]
    call_id: Text
    output: Content
    id: str | None = None
    status: ItemStatus | None = None
    name: Text | None = None  # the function's: names the tool turn (else the call's, where known)

    @model_validator(mode="before")
    @classmethod
    def _said_nothing(cls, value: Any) -> Any:
        # As the openai SDK dumps an output item it listed (a caller or namespace given is refused).
        return said_nothing(value, {"caller": (None,), "namespace": (None,), "created_by": (None,)})


class UnsupportedItem(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _refuse(cls, value: Any) -> Any:
        raise ValueError(
            f"input items of type {item_type(value)!r} are not supported (only {', '.join(ITEM_TYPES)})"
        )


def _item_tag(value: Any) -> str:
    kind = item_type(value, "message")
    return f"item[{kind if kind in ITEM_TYPES else 'unsupported'}]"


# Tagged ``item[…]``: pydantic puts the tag in an error's location, and a part with a bracket is
# no field the client sent, so the 400's param leaves it out (input.0.content, not
# input.0.message.content).
InputItem = Annotated[
    Annotated[MessageItem, Tag("item[message]")]
    | Annotated[FunctionCallItem, Tag("item[function_call]")]
    | Annotated[FunctionCallOutputItem, Tag("item[function_call_output]")]
    | Annotated[UnsupportedItem, Tag("item[unsupported]")],
    Discriminator(_item_tag),
]


def chat_messages(items: list[InputItem], history: list[ChatMessage]) -> list[ChatMessage]:
    """``history`` (earlier turns), then ``items`` as chat messages. The assistant's items that
    follow one another (a response's output sent back: its text, its calls, text after them)
    are one assistant turn, as the model wrote them. ``history``'s messages are not changed: a
    turn this input extends is a copy."""
    messages = list(history)
    names = {call.id: call.function.name for m in history for call in m.tool_calls or []}
    for n, item in enumerate(items):
        if isinstance(item, MessageItem):
            role = "system" if item.role == "developer" else item.role
            same_turn = role == "assistant" and n > 0 and messages[-1].role == "assistant"
            if same_turn:  # after the same turn's text or call, in this input
                last = messages[-1]
                # Two texts in a row are two messages (a line apart, as a message's parts are);
                # the text after a call goes on from the text before it, as the model wrote it.
                joint = "\n" if isinstance(items[n - 1], MessageItem) and last.content else ""
                messages[-1] = last.model_copy(update={"content": last.content + joint + _text(item.content)})
            else:
                messages.append(ChatMessage(role=role, content=_text(item.content)))
        elif isinstance(item, FunctionCallItem):
            names[item.call_id] = item.name
            call = ToolCall(id=item.call_id, function=FunctionCall(name=item.name, arguments=item.arguments))
            if not (messages and messages[-1].role == "assistant"):
                messages.append(ChatMessage(role="assistant"))
            last = messages[-1]
            if all(made.id != call.id for made in last.tool_calls or []):  # sent again: once is enough
                messages[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []), call]})
        elif isinstance(item, FunctionCallOutputItem):
            answer = ChatMessage(role="tool", content=_text(item.output), tool_call_id=item.call_id)
            answer.name = item.name or names.get(item.call_id)
            messages.append(answer)
    return messages


def _part(role: str, part: TextPart) -> dict[str, Any]:
    if role == "assistant":
        return {"type": "output_text", "text": part.text, "annotations": []}
    return {"type": "input_text", "text": part.text}


def listed_items(items: list[InputItem], job_id: str) -> list[dict[str, Any]]:
    """The items as the API lists them, each with an id (the one given, else one made from the
    job's id and its place)."""
    listed: list[dict[str, Any]] = []
    for n, item in enumerate(items):
        if isinstance(item, MessageItem):
            content = item.content
            parts = [TextPart(type="input_text", text=content)] if isinstance(content, str) else content
            listed.append(
                {
                    "id": item.id or f"msg_{job_id}_in{n}",
                    "type": "message",
                    "role": item.role,
                    "content": [_part(item.role, part) for part in parts],
                }
            )
        elif isinstance(item, FunctionCallItem):
            call = item.model_dump(include={"call_id", "name", "arguments"})
            listed.append({"id": item.id or f"fc_{job_id}_in{n}", "type": "function_call", **call})
        elif isinstance(item, FunctionCallOutputItem):
            output = item.output
            listed.append(
                {
                    "id": item.id or f"fco_{job_id}_in{n}",
                    "type": "function_call_output",
                    "call_id": item.call_id,
                    **({"name": item.name} if item.name else {}),
                    "output": output
                    if isinstance(output, str)
                    else [p.model_dump(exclude_none=True) for p in output],
                }
            )
        listed[-1]["status"] = "completed"
    return listed
