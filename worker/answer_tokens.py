"""One job's answer as its tokens arrive: text deltas, stop sequences, end of sequence, budget.

The single-job decode loop and the batching engine both feed sampled tokens through this, so
a job's text and finish reason do not depend on how it was scheduled.
"""

from __future__ import annotations

from typing import Any

from worker.text_decoding import IncrementalDecoder, StopMatcher


class AnswerTokens:
    def __init__(self, tokenizer: Any, eos_ids: set[int], stop: list[str], budget: int) -> None:
        self._decoder = IncrementalDecoder(tokenizer)
        self._stops = StopMatcher(stop)
        self._eos_ids = eos_ids
        self.budget = budget
        self.completion_tokens = 0
        self.finish_reason: str | None = None

    @property
    def token_ids(self) -> list[int]:
        """The answer's token ids so far (an end-of-sequence token is not among them)."""
        return self._decoder.ids

    def push(self, token: int) -> str:
        """Take the next sampled token; returns the text it adds. Sets ``finish_reason`` ("stop"
        or "length") when the answer has ended: end of sequence, a stop sequence, the budget."""
        if self.finish_reason is not None:
            raise RuntimeError("the answer has already ended")
        if token in self._eos_ids:  # a token the model generated (counted, as vLLM and OpenAI do)
            self.completion_tokens += 1
            tail, _ = self._stops.push(self._decoder.flush())
            self.finish_reason = "stop"
            return tail + self._stops.flush()
        self.completion_tokens += 1
        text, stopped = self._stops.push(self._decoder.push(token))
        if stopped:
            self.finish_reason = "stop"
        elif self.completion_tokens >= self.budget:
            tail, stopped = self._stops.push(self._decoder.flush())
            text += tail if stopped else tail + self._stops.flush()
            self.finish_reason = "stop" if stopped else "length"
        return text

    def end(self, reason: str) -> str:
        """The engine ended the answer by itself (``reason``: "stop" or "length"); returns the text
        still held back. A no-op once ``finish_reason`` is set."""
        if self.finish_reason is not None:
            return ""
        tail, stopped = self._stops.push(self._decoder.flush())
        self.finish_reason = "stop" if stopped else reason
        return tail if stopped else tail + self._stops.flush()
