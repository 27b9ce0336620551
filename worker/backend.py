"""What a model backend gives the job runner: a stream of generation steps for one request."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from shared.schemas import GenerationRequest


@dataclass(frozen=True)
class GenerationStep:
    """One step of a job's generation: the text it adds and the token counts so far."""

    delta: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # set on the last step only: "stop" or "length"


class LoadedModel:
    """A model and its tokenizer, loaded on a device, served under ``name``."""

    def __init__(self, model: Any, tokenizer: Any, name: str, device: str, dtype: str) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.dtype = dtype


class InvalidJobRequest(ValueError):
    """The request cannot be served by this model (e.g. max_length is not above the prompt)."""


class ChatBackend(Protocol):
    """A loaded chat model. ``generate`` yields steps until the answer ends; closing the
    iterator early (a cancel) stops generation at once."""

    name: str
    device: str
    dtype: str

    def generate(self, request: GenerationRequest) -> Iterator[GenerationStep]: ...


def answer_budget(request: GenerationRequest, prompt_tokens: int, context_length: int | None) -> int:
    """How many new tokens the job may generate, or InvalidJobRequest when none fit."""
    budget = request.max_tokens
    if request.max_length is not None:
        if request.max_length <= prompt_tokens:
            raise InvalidJobRequest(
                f"max_length ({request.max_length}) must be greater than the prompt's length "
                f"({prompt_tokens} tokens)"
            )
        budget = min(budget, request.max_length - prompt_tokens)
    if context_length is not None:
        if prompt_tokens >= context_length:
            raise InvalidJobRequest(
                f"the prompt is {prompt_tokens} tokens long; the model's context holds {context_length}"
            )
        budget = min(budget, context_length - prompt_tokens)
    return budget
