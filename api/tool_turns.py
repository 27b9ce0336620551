"""Whether a conversation's tool results answer its calls, checked as OpenAI checks them.

Chat completions (``tool_turn_problem``):
- a ``tool`` turn answers a call of the assistant turn with ``tool_calls`` before it (only tool
  turns between them): its ``tool_call_id`` is the id of one of those calls;
- every call of such an assistant turn is answered before the conversation goes on.

Responses (``unpaired_output``) pairs outputs with calls by id wherever they sit, as its input
is written (``input += response.output`` puts the model's text after its call before the
client appends the outputs): every output answers a call made before it, and every call is
answered. ``answers_after_calls`` then puts each result right after its call's turn, where a
chat template expects it.

A conversation that breaks these is refused (OpenAI answers a 400 as well), instead of being
rendered for the model with a result that answers nothing, or a call left without its result.
The chat route names the message (``messages.3.tool_call_id``), the Responses route its input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

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


def unpaired_output(messages: Sequence[Turn]) -> TurnProblem | None:
    """Responses' rule: the first output that answers no call made before it, else the first
    call no output answers; None when every output and call pair up."""
    callers: dict[str, int] = {}  # call id → the place of the turn that made it
    answered: set[str] = set()
    for index, message in enumerate(messages):
        if message.role == "tool":
            answer = message.tool_call_id or ""
            if answer not in callers:
                return TurnProblem(index, "tool_call_id", answer, f"no call {answer} before it")
            answered.add(answer)
        elif message.role == "assistant":
            for call in message.tool_calls or []:
                callers.setdefault(call.id, index)
    for call_id, index in callers.items():
        if call_id not in answered:
            return TurnProblem(index, "tool_calls", call_id, f"no output answers call {call_id}")
    return None


T = TypeVar("T", bound=Turn)


def answers_after_calls(messages: list[T]) -> list[T]:
    """The conversation with each result right after the turn that made its call (results in
    the order given); the turns that came between them follow. For a conversation that
    ``unpaired_output`` passes."""
    results: dict[str, list[T]] = {}
    for message in messages:
        if message.role == "tool":
            results.setdefault(message.tool_call_id or "", []).append(message)
    ordered: list[T] = []
    for message in messages:
        if message.role == "tool":
            continue
        ordered.append(message)
        calls = message.tool_calls if message.role == "assistant" else None
        for call in calls or []:
            ordered += results.pop(call.id, [])
    return ordered
