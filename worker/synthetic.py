"""A model-free backend for load tests: ``streamq worker --backend synthetic --tokens-per-second R``.

Each job "generates" ``max_tokens`` tokens at R tokens per second (a word per token; fewer when a
``max_length`` leaves less room beside the prompt, counted a word per token as well), through
the same engine, publisher and Redis path as a real model. Operators use it to size Redis and
fronts (how many streams a front carries, how fast deltas reach clients) without a GPU.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from typing import Any

from shared.limits import answer_budget
from shared.schemas import RAW_PROMPT, PromptInput
from worker.engine import EngineJob, JobOutput
from worker.text_decoding import StopMatcher

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


# A job's tokens after its first come out on a step clock of this period (its first comes at
# once): each step gives every job whose time has come its next token, as a batching engine's
# step does. Paced to the token, 1,000 jobs at 20 tokens/s asked for 20,000 steps a second, each
# going over every job, and the engine thread, stepping as fast as it could, took most of a core
# from the front and Redis it is there to load.
STEP_SECONDS = 0.001
# The engine looks at its jobs' cancels and deadlines between two waits: at a slow pace (0.1
# token/s) a cancel waited for the next token, or a second.
LOOK_EVERY = 0.05


class SyntheticModel:
    engine = "synthetic"
    # Raw prompts (its answers never depend on the prompt); no penalties, logit bias,
    # structured output, logprobs or tools. Stop sequences end its answers as a model's.
    features: frozenset[str] = frozenset({RAW_PROMPT})

    def __init__(self, backend: SyntheticBackend, slots: int) -> None:
        self.slots = slots
        self._interval = 1.0 / backend.tokens_per_second
        self._backend = backend
        # A heap of (step time, entry number, paced time, job): the earliest next token first.
        self._due: list[tuple[float, int, float, EngineJob]] = []
        self._live: dict[EngineJob, int] = {}  # each job's live entry (a removed job has none)
        self._budget: dict[EngineJob, int] = {}  # each job's last token's number (max_length's too)
        self._stops: dict[EngineJob, StopMatcher] = {}  # its stop sequences, as a model's answer ends at one
        self._numbers = itertools.count()

    def prepare(self, job: EngineJob) -> None:
        """Nothing to set up outside the engine thread."""

    def add(self, job: EngineJob) -> None:
        job.prompt_tokens = self._backend.prompt_tokens(job.request)
        # InvalidJobRequest (a max_length not above the prompt) refuses the job, as a model does
        self._budget[job] = answer_budget(job.request, job.prompt_tokens, None)
        job.completion_tokens = len(job.resume_ids)  # a continued job goes on from there
        stops = self._stops[job] = StopMatcher(job.request.stop)
        for n in range(1, job.completion_tokens + 1):  # what the earlier run held back, held again
            stops.push(self._backend.token_text(n))
        now = time.monotonic()
        self._push(job, now, now)  # the first token comes at once

    def remove(self, job: EngineJob) -> None:
        self._live.pop(job, None)  # its heap entry is skipped when it comes up
        self._budget.pop(job, None)
        self._stops.pop(job, None)

    def ready_in(self) -> float | None:
        while self._due and self._live.get(self._due[0][3]) != self._due[0][1]:
            heapq.heappop(self._due)  # a removed job's
        if not self._due:
            return None
        return max(0.0, min(self._due[0][0] - time.monotonic(), LOOK_EVERY))

    def step(self) -> list[JobOutput]:
        now = time.monotonic()
        outputs = []
        while self._due and self._due[0][0] <= now:
            _at, number, paced, job = heapq.heappop(self._due)
            if self._live.get(job) != number:
                continue  # removed
            job.completion_tokens += 1
            n = job.completion_tokens
            stops = self._stops[job]
            text, stopped = stops.push(self._backend.token_text(n))
            reason = "stop" if stopped else "length" if n >= self._budget[job] else None
            if reason is not None:
                text += "" if stopped else stops.flush()
                self.remove(job)
            else:  # on the first tick after its paced time (paced keeps the rate: no drift)
                paced += self._interval
                self._push(job, math.ceil(paced / STEP_SECONDS) * STEP_SECONDS, paced)
            outputs.append(JobOutput(job, text, job.prompt_tokens, n, reason, token_ids=(n,)))
        return outputs

    def _push(self, job: EngineJob, at: float, paced: float) -> None:
        number = next(self._numbers)
        self._live[job] = number
        heapq.heappush(self._due, (at, number, paced, job))
