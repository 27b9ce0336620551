"""Whether a conversation's tool turns answer its calls, checked as OpenAI checks them.

- A ``tool`` turn answers a call of the assistant turn with ``tool_calls`` before it (only tool
  turns between them): its ``tool_call_id`` is the id of one of those calls.
- Every call of such an assistant turn is answered before the conversation goes on.

A conversation that breaks either is refused (OpenAI answers a 400 as well), instead of being
rendered for the model with a result that answers nothing, or a call left without its result.
The chat route names the message (``messages.3.tool_call_id``), the Responses route its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from shared.schemas import ToolCall


class Turn(Protocol):
    """A message as both routes hold it (chat's OpenAIMessage, streamq's ChatMessage)."""

    @property
    def role(self) -> str: ...
    @property
    def tool_calls(self) -> list[ToolCall] | None: ...
    @property
    def tool_call_id(self) -> str | None: ...


@dataclass(frozen=True)
class TurnProblem:
    index: int  # the message's place in the conversation
    field: str  # role, tool_call_id or tool_calls
    call_id: str  # the call id at fault: a tool turn's, or an unanswered call's
    message: str  # said in chat's terms (messages, tool_calls, tool_call_id)


def tool_turn_problem(messages: Sequence[Turn]) -> TurnProblem | None:
    """The first way the conversation's tool turns fail to answer its calls, or None."""
    caller = -1  # the place of the last assistant turn with calls, while its answers may follow
    calls: list[str] = []
    unanswered: list[str] = []
    for index, message in enumerate(messages):
        if message.role == "tool":
            answered = message.tool_call_id or ""
            if caller < 0:
                return TurnProblem(
                    index,
                    "role",
                    answered,
                    f"messages.{index}: a 'tool' message must answer a call of an assistant message "
                    "with 'tool_calls' before it (only 'tool' messages between them)",
                )
            if answered not in calls:
                return TurnProblem(
                    index,
                    "tool_call_id",
                    answered,
                    f"messages.{index}: tool_call_id '{answered}' is not the id of a call of message "
                    f"{caller} (its calls: {', '.join(calls)})",
                )
            unanswered = [call for call in unanswered if call != answered]
            continue
        if unanswered:
            return _unanswered(caller, unanswered)
        caller, calls, unanswered = -1, [], []
        if message.role == "assistant" and message.tool_calls:
            caller = index
            calls = list(dict.fromkeys(call.id for call in message.tool_calls))  # a call sent twice is one
            unanswered = list(calls)
    return _unanswered(caller, unanswered) if unanswered else None


def _unanswered(caller: int, unanswered: list[str]) -> TurnProblem:
    return TurnProblem(
        caller,
        "tool_calls",
        unanswered[0],
        f"messages.{caller}: an assistant message with 'tool_calls' must be followed by a 'tool' "
        f"message answering each call; no answer to: {', '.join(unanswered)}",
    )
