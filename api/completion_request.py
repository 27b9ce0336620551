"""The body of ``POST /v1/completions`` (OpenAI's legacy text completion), turned into job
requests: one per prompt. Its fields shared with chat completions are ``OpenAIFields``."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, ModelWrapValidatorHandler, PrivateAttr, field_validator, model_validator

from api.errors import ApiError
from api.openai_schemas import OpenAIFields, refuse_unless
from shared.logprobs import MAX_PROMPT_LOGPROBS, LogprobCount
from shared.schemas import JobRequest, Text

PromptIds = list[Annotated[int, Field(ge=0, strict=True)]]
# A completion's length when the request gives none: 16 tokens, as OpenAI's legacy completions
# and vLLM answer it (a prompt that leaves less room is refused, naming max_tokens, as OpenAI
# does; vLLM answers with the room left).
COMPLETION_MAX_TOKENS = 16
# Prompts in one /v1/completions request (lm-evaluation-harness sends its batch_size): each is
# a job of its own, answered as one choice of the completion.
MAX_PROMPTS = 64


class CompletionRequest(OpenAIFields):
    """Body of ``POST /v1/completions``: the prompt goes to the model as it is (no chat template),
    as text or as token ids; a list of prompts is a job each, answered as the choices in order."""

    prompt: Text | list[Text] | PromptIds | list[PromptIds]
    logprobs: LogprobCount = Field(None, description="each token's log probability and this many others")
    echo: bool | None = Field(
        False, strict=True, description="the answer begins with the prompt (and its logprobs)"
    )
    best_of: int | None = Field(None, strict=True, description="only 1 (one choice per request)")
    suffix: str | None = Field(None, description="text after the insertion: not supported")
    _prompt_only: bool = PrivateAttr(False)

    @model_validator(mode="wrap")
    @classmethod
    def _scoring(cls, data: Any, handler: ModelWrapValidatorHandler[CompletionRequest]) -> CompletionRequest:
        """``max_tokens: 0`` with ``echo``: the prompt alone comes back, with its logprobs (legacy
        OpenAI's way to score a prompt, and vLLM's). Its job answers one token, left out."""
        scoring = isinstance(data, dict) and data.get("echo") is True and _zero(data.get("max_tokens"))
        request = handler({**data, "max_tokens": 1} if scoring else data)
        request._prompt_only = scoring
        return request

    @property
    def prompt_only(self) -> bool:
        return self._prompt_only

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: Any) -> Any:
        prompts = _prompt_list(value)
        if len(prompts) > MAX_PROMPTS:
            raise ValueError(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}")
        if not value or not all(prompts):
            raise ValueError("the prompt must not be empty")
        return prompts[0] if len(prompts) == 1 else value

    @field_validator("max_tokens", mode="before")
    @classmethod
    def _no_empty_answer(cls, value: Any) -> Any:
        """``max_tokens: 0`` goes with ``echo`` only (``_scoring``): an answer of nothing else."""
        if _zero(value):
            raise ValueError("must be at least 1, or 0 with echo (the prompt alone, to score it)")
        return value

    @field_validator("best_of")
    @classmethod
    def _one_of_one(cls, value: int | None) -> int | None:
        return refuse_unless(value, (None, 1), f"only best_of=1 is supported, got {value}")

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return refuse_unless(value, (None, ""), "suffix (insertion) is not supported by this server")

    def prompts(self) -> list[str | list[int]]:
        """The prompts, in order: one, or those of a list."""
        return _prompt_list(self.prompt)

    def job_request(self, prompt: str | list[int]) -> JobRequest:
        """The job of one of the prompts."""
        if self.echo and self.logprobs is not None and self.logprobs > MAX_PROMPT_LOGPROBS:
            message = f"with echo, logprobs is at most {MAX_PROMPT_LOGPROBS} (every prompt token gets them)"
            raise ApiError(400, message, param="logprobs")
        fields: dict[str, Any] = {"raw_prompt": prompt}
        if self.max_tokens is None:  # this route's default, OpenAI's and vLLM's
            fields["max_tokens"] = COMPLETION_MAX_TOKENS
        if self.logprobs is not None:
            fields["logprobs"] = self.logprobs
        if self.echo and (self.logprobs is not None or not isinstance(prompt, str)):
            # The prompt's tokens (and their logprobs) come from the worker's tokenizer.
            fields["prompt_logprobs"] = self.logprobs or 0
        return self._job_request(**fields)


def _zero(value: Any) -> bool:
    return type(value) is int and value == 0  # not False, not 0.0 (max_tokens is an integer)


def _prompt_list(value: Any) -> list[Any]:
    """A prompt field's prompts: a list of texts or of token-id lists, or one of either."""
    return list(value) if isinstance(value, list) and value and isinstance(value[0], str | list) else [value]


# Job-request fields as the completion request names them (a refusal names what the client sent).
COMPLETION_PARAMS = {
    "prompt_logprobs": "echo",
    "raw_prompt": "prompt",
    "messages": "prompt",
    "logprobs": "logprobs",
}
