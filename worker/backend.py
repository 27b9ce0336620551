"""What a model backend gives the job runner: a stream of generation steps for one request."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from shared.schemas import GenerationRequest, PromptInput


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


class ServedModel(Protocol):
    """What a worker serves, as the worker's threads see it: a name, where it runs, and how
    long a prompt is in its tokens."""

    name: str
    device: str
    dtype: str
    tokenizer: Any
    context_length: int | None

    def prompt_tokens(self, prompt: PromptInput, tokenizer: Any = None) -> int:
        """The prompt's length in tokens (with ``tokenizer``, a copy for another thread, if given)."""
        ...


class ChatBackend(ServedModel, Protocol):
    """A loaded chat model. ``generate`` runs one job alone and yields steps until the answer
    ends; closing the iterator early (a cancel) stops generation at once."""

    def generate(self, request: GenerationRequest) -> Iterator[GenerationStep]: ...
