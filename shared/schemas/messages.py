"""A conversation's turns and the tools it may call: the messages of a job request, and their
text, which must be valid Unicode."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator


def valid_unicode(text: str) -> bool:
    """Whether ``text`` is valid Unicode: no lone surrogate (such as "\\ud800" in JSON)."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _encodable(value: str) -> str:
    """Refuse text that is not valid Unicode (lone surrogates such as "\\ud800" in JSON)."""
    if not valid_unicode(value):
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)")
    return value


Text = Annotated[str, AfterValidator(_encodable)]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Text
    arguments: Text = Field(description="the call's arguments: a JSON object, as text (OpenAI's form)")


class ToolCall(BaseModel):
    """A call an assistant made, as OpenAI writes it in ``message.tool_calls``."""

    model_config = ConfigDict(extra="ignore")

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One turn of a conversation. ``tool`` turns answer an assistant's ``tool_calls``. (What a
    client may send as one is checked where it comes in: ``whole_turn``.)"""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    name: Text | None = None  # the speaker's (or a tool turn's function) name, for the template
    tool_calls: list[ToolCall] | None = None  # assistant turns only
    tool_call_id: Text | None = None  # tool turns only: the call this answers

    def template_turn(self) -> dict[str, Any]:
        """The turn as Hugging Face chat templates take it: a call's arguments as an object."""
        turn: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            turn["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            turn["name"] = self.name
        return turn


# What an answer from an OpenAI-compatible server carries, which a client sends back with it: taken
# when empty (as on the chat route); the SDK's parse() adds ``parsed``, which is not read.
SENT_BACK = frozenset({"refusal", "annotations", "audio", "function_call"})


def turn_problem(role: Any, has_content: bool, has_calls: bool) -> str | None:
    """What OpenAI refuses in a turn of this role (every route's check): no content but an
    assistant's (which may hold calls alone), calls off an assistant."""
    if role != "assistant" and not has_content:
        return f"a '{role}' message needs 'content'"
    if has_calls and role != "assistant":
        return "only an 'assistant' message has 'tool_calls'"
    return None


def whole_turn(value: Any) -> Any:
    """A turn as a client sends it (a JSON object), refused as OpenAI refuses it: no ``content``
    but an assistant's (which may hold calls alone), ``tool_calls`` off an assistant, or a field
    it does not know (one an answer carries is taken when empty). Stored turns, which may leave
    out an empty content, are not checked."""
    if not isinstance(value, dict):
        return value
    problem = turn_problem(value.get("role"), "content" in value, bool(value.get("tool_calls")))
    if problem is not None:
        raise ValueError(problem)
    known = ChatMessage.model_fields.keys() | {"parsed"}
    unknown = [k for k in value if k not in known and not (k in SENT_BACK and value[k] in (None, []))]
    if unknown:
        raise ValueError(f"a message has no field '{unknown[0]}'")
    if value.get("role") == "assistant" and "content" in value and value["content"] is None:
        return {**value, "content": ""}  # OpenAI's turn of calls alone (its SDK's model_dump())
    return value


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments")
    strict: bool | None = Field(None, strict=True)


class ToolDefinition(BaseModel):
    """A function the model may call (OpenAI's ``tools`` entries; only ``function`` tools). A tool
    of another type (OpenAI's ``custom`` free-form tools, a built-in one) is refused on its
    ``type``, not on the fields that come with it (``custom`` is not "an unknown parameter")."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition

    @model_validator(mode="before")
    @classmethod
    def _only_the_type(cls, value: Any) -> Any:
        # Another type: only its type is checked (and refused), with a stand-in function, so that
        # the refusal is the type's alone (not also "function: Field required").
        if isinstance(value, dict) and value.get("type", "function") != "function":
            return {"type": value["type"], "function": {"name": "unused"}}
        return value

    @field_validator("type", mode="before")
    @classmethod
    def _named_type(cls, value: Any) -> Any:
        if value != "function":
            raise ValueError(
                f"tools of type {json.dumps(value)} are not supported: only functions (no template "
                "here renders custom or built-in tools, nor parses their calls)"
            )
        return value
