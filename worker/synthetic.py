"""A model-free backend for load tests: ``streamq worker --backend synthetic --tokens-per-second R``.

Each job "generates" ``max_tokens`` tokens at R tokens per second (a word per token), through
the same engine, publisher and Redis path as a real model. Operators use it to size Redis and
fronts (how many streams a front carries, how fast deltas reach clients) without a GPU.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from shared.schemas import RAW_PROMPT, PromptInput
from worker.engine import EngineJob, JobOutput

TEXT_PER_TOKEN = 4
WORDS = ("lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit")


class SyntheticBackend:
    """Stands where a loaded model would (name, device, prompt counting) for a synthetic worker."""

    device = "none"
    dtype = "none"
    tokenizer: Any = None
    context_length: int | None = None

    def __init__(self, name: str, tokens_per_second: float, text: str | None = None) -> None:
        self.name = name
        self.tokens_per_second = tokens_per_second
        self.text = text
        # The text repeated enough that any token's 4 characters are one slice of it.
        self._cycle = text * (TEXT_PER_TOKEN // len(text) + 2) if text else ""

    def token_text(self, n: int) -> str:
        """The n-th token's text (n from 1): a word, or the next 4 characters of ``text``."""
        if not self.text:
            return WORDS[n % len(WORDS)] + " "
        start = (n - 1) * TEXT_PER_TOKEN % len(self.text)
        return self._cycle[start : start + TEXT_PER_TOKEN]

    def prompt_tokens(self, prompt: PromptInput, tokenizer: Any = None) -> int:
        if prompt.token_ids is not None:
            return len(prompt.token_ids)
        if prompt.text is not None:
            return len(prompt.text.split()) + 1
        return sum(len(m.content.split()) + 4 for m in prompt.messages)


@dataclass(eq=False)
class _Paced:
    job: EngineJob
    due: float  # monotonic time of the next token


class SyntheticModel:
    engine = "synthetic"
    # Raw prompts (its answers never depend on the prompt); no penalties, logit bias,
    # structured output, logprobs or tools.
    features: frozenset[str] = frozenset({RAW_PROMPT})

    def __init__(self, backend: SyntheticBackend, slots: int) -> None:
        self.slots = slots
        self._interval = 1.0 / backend.tokens_per_second
        self._backend = backend
        self._jobs: dict[EngineJob, _Paced] = {}

    def prepare(self, job: EngineJob) -> None:
        """Nothing to set up outside the engine thread."""

    def add(self, job: EngineJob) -> None:
        job.prompt_tokens = self._backend.prompt_tokens(job.request)
        job.completion_tokens = len(job.resume_ids)  # a continued job goes on from there
        self._jobs[job] = _Paced(job, time.monotonic())  # the first token comes at once

    def remove(self, job: EngineJob) -> None:
        self._jobs.pop(job, None)

    def ready_in(self) -> float | None:
        if not self._jobs:
            return None
        return max(0.0, min(p.due for p in self._jobs.values()) - time.monotonic())

    def step(self) -> list[JobOutput]:
        now = time.monotonic()
        outputs = []
        for job, paced in list(self._jobs.items()):
            if paced.due > now:
                continue
            paced.due += self._interval
            job.completion_tokens += 1
            n = job.completion_tokens
            done = n >= job.request.max_tokens
            if done:
                del self._jobs[job]
            text = self._backend.token_text(n)
            reason = "length" if done else None
            outputs.append(JobOutput(job, text, job.prompt_tokens, n, reason, token_ids=(n,)))
        return outputs
