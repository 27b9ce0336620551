"""What a worker runs: the model's input, and the whole request resolved against the server's
limits, with the engine features it needs."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, Field

from shared.schemas.engine_features import (
    LOGIT_BIAS,
    LOGPROBS,
    PENALTIES,
    PROMPT_LOGPROBS,
    RAW_PROMPT,
    STRICT_CALLS,
    STRUCTURED_OUTPUT,
    TOOLS,
)
from shared.schemas.messages import ChatMessage, ToolDefinition
from shared.tool_call_format import json_answer_schema


class PromptInput(BaseModel):
    """What the model is given: a conversation (with the tools it may call) rendered by the chat
    template, or a raw prompt, as text or token ids."""

    messages: list[ChatMessage] = Field(default_factory=list)
    tools: list[ToolDefinition] | None = None
    text: str | None = None  # a raw prompt: tokenized as it is
    token_ids: list[int] | None = None  # a raw prompt: these tokens

    @property
    def raw(self) -> bool:
        return self.text is not None or self.token_ids is not None

    def size_bytes(self) -> int:
        """An upper bound of its length in tokens, before the template (see limits.may_not_fit)."""
        if self.token_ids is not None:
            return len(self.token_ids)
        if self.text is not None:
            return len(self.text.encode("utf-8"))
        # UTF-8 bytes, not characters: a CJK character is 3 bytes, and may be 2 tokens.
        return sum(len(m.model_dump_json().encode("utf-8")) for m in self.messages) + len(
            json.dumps([t.model_dump() for t in self.tools or []])
        )


class GenerationRequest(PromptInput):
    """What a worker needs to run a job: stored with the job, resolved against server limits."""

    max_tokens: int
    # The client set max_tokens: prompt and answer must fit the model's context together, or
    # the job is refused (OpenAI's and vLLM's rule). A server default is cut to the room left.
    max_tokens_given: bool = False
    max_length: int | None = None
    temperature: float
    top_p: float
    top_k: int = 0
    stop: list[str] = Field(default_factory=list)
    seed: int | None = None
    queue_ttl: int | None = None  # this job's own limits, within the server's
    timeout: int | None = None
    max_prompt_tokens: int | None = None  # the front's limit, checked by the worker's tokenizer
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = Field(default_factory=dict)
    json_schema: dict[str, Any] | None = None  # the answer is JSON following this schema
    json_object: bool = False  # the answer is a JSON object
    # Strict functions (api.strict_tools): xgrammar's structural tag that holds the answer's calls.
    structural_tag: dict[str, Any] | None = None
    logprobs: int | None = None  # None: no log probabilities; k: the token's and the k likeliest
    prompt_logprobs: int | None = None  # the same for the prompt's tokens

    def grammar_field(self, answer_start: bytes | None = None) -> str | None:
        """The request field its grammar comes from, if it has one: a JSON answer's
        ``response_format``, or the ``tools`` whose calls it holds; beside a JSON answer, the one
        whose branch the answer took (``answer_start``: its first token's bytes; a call's begin
        with "<")."""
        if self.json_schema is not None or self.json_object:
            return "response_format"
        if self.structural_tag is None:
            return None
        if answer_start and self.json_or_calls() is not None and not answer_start.lstrip().startswith(b"<"):
            return "response_format"
        return "tools"

    def json_or_calls(self) -> dict[str, Any] | None:
        """Where tools go beside a JSON ``response_format`` (``shared.tool_call_format``'s
        ``calls_or_json``: the answer is calls, or that JSON), the JSON's schema."""
        return json_answer_schema(self.structural_tag)

    def prompt_input(self) -> PromptInput:
        return PromptInput(messages=self.messages, tools=self.tools, text=self.text, token_ids=self.token_ids)

    def engine_features(self) -> dict[str, str]:
        """The engine features this request needs, each with the request field that asks for it."""
        needed: dict[str, str] = {}
        for name, value, neutral in (
            ("presence_penalty", self.presence_penalty, 0.0),
            ("frequency_penalty", self.frequency_penalty, 0.0),
            ("repetition_penalty", self.repetition_penalty, 1.0),
        ):
            if value != neutral:
                needed.setdefault(PENALTIES, name)
        if self.logit_bias:
            needed[LOGIT_BIAS] = "logit_bias"
        if self.json_schema is not None or self.json_object:
            needed[STRUCTURED_OUTPUT] = "response_format"
        elif self.structural_tag is not None:
            needed[STRICT_CALLS] = "tools"
        if self.logprobs is not None:
            needed[LOGPROBS] = "logprobs"
        if self.prompt_logprobs is not None:
            needed[PROMPT_LOGPROBS] = "prompt_logprobs"
        if self.raw:
            needed[RAW_PROMPT] = "raw_prompt"
        if self.tools:
            needed[TOOLS] = "tools"
        return needed
