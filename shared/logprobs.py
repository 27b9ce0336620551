"""Log probabilities as a job's stream carries them (each ``delta`` event's ``logprobs``, and its
first one's ``prompt_logprobs``), in OpenAI's chat entry shape."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, Field

MAX_LOGPROBS = 20  # most alternatives per token (OpenAI's top_logprobs limit)
MAX_PROMPT_LOGPROBS = 5  # per prompt token (OpenAI's completions limit): every prompt token has them

# How many likeliest tokens a request asks for at each answer token: the bounds every request
# model takes it with (chat's top_logprobs, completions' and the job's logprobs).
LogprobCount = Annotated[int | None, Field(ge=0, le=MAX_LOGPROBS, strict=True)]


class TopLogprob(BaseModel):
    """A token and its log probability, in OpenAI's chat form (``bytes``: its UTF-8 bytes)."""

    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    """A token of the text with its log probability and the most likely tokens at its place.
    A prompt's first token has no log probability (None), and no alternatives."""

    logprob: float | None  # type: ignore[assignment]
    top_logprobs: list[TopLogprob] = Field(default_factory=list)
