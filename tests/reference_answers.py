"""What the tiny model answers, run in this process (greedy): the reference for the stack's answers."""

from __future__ import annotations

from typing import Any

from shared.schemas import ChatMessage, GenerationRequest


def greedy_answer(backend: Any, content: str, max_tokens: int) -> str:
    """What the tiny model answers, run in this process: the reference for the stack's answers."""
    req = GenerationRequest(
        messages=[ChatMessage(role="user", content=content)],
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
    )
    return "".join(step.delta for step in backend.generate(req))


def greedy(messages: list[ChatMessage], max_tokens: int) -> GenerationRequest:
    return GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=0.0, top_p=1.0)


def answer_to(backend: Any, messages: list[ChatMessage], max_tokens: int) -> str:
    return "".join(step.delta for step in backend.generate(greedy(messages, max_tokens)))
