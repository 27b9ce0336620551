"""Request bodies of the OpenAI-compatible routes, turned into streamq job requests.

Nothing is silently ignored: every field OpenAI defines for these routes is declared here and
either honoured or refused with a 400 that names it; a field OpenAI does not define (and that
is not one of streamq's extensions) is refused as unknown (``extra="forbid"``, see
``api.errors``). The README's field table says which is which."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from api.errors import ApiError
from api.tool_calls import ToolChoice, ToolPlan, plan_tools
from api.tool_turns import tool_turn_problem
from api.validation_messages import first_error
from shared.logprobs import LogprobCount
from shared.schemas import (
    ChatMessage,
    JobRequest,
    SamplingFields,
    Text,
    ToolCall,
    ToolDefinition,
)
from shared.schemas.messages import turn_problem

Role = Literal["system", "developer", "user", "assistant", "tool"]


def refuse_unless(value: Any, allowed: tuple[Any, ...], message: str) -> Any:
    if value not in allowed:
        raise ValueError(message)
    return value


def _one_tier(value: str | None) -> str | None:
    return refuse_unless(value, (None, "auto", "default"), f"service tier {value!r} is not offered")


ServiceTier = Annotated[str | None, AfterValidator(_one_tier)]  # 'auto' or 'default': one tier here


def _small_metadata(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is not None and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
        raise ValueError("at most 16 pairs, keys of at most 64 characters and values of at most 512")
    return value


# OpenAI's metadata (chat, completions, Responses), with its limits.
Metadata = Annotated[dict[str, str] | None, AfterValidator(_small_metadata)]


class OpenAIMessage(BaseModel):
    # A field OpenAI's messages do not have is refused by name (``messages.0.foo``), as at the top.
    model_config = ConfigDict(extra="forbid")

    role: Role
    content: Text | None = Field(
        None,
        description='a string, or a list of text parts [{"type": "text", "text": ...}] (joined by newlines)',
    )
    name: Text | None = Field(None, description="given to the chat template with the turn")
    tool_calls: list[ToolCall] | None = Field(None, description="an assistant turn's calls")
    tool_call_id: Text | None = Field(None, description="a tool turn: the call it answers")
    audio: Any = Field(None, description="not supported: refused unless null")
    function_call: Any = Field(None, description="deprecated, not supported: use tool_calls")
    refusal: Any = Field(None, description="an answer's refusal, sent back with it: only null")
    annotations: Any = Field(None, description="an answer's annotations, sent back with it: none")
    parsed: Any = Field(
        None, description="the openai SDK's parse() result, sent back with its answer: not read (content is)"
    )

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, list):
            return value
        if not value:
            # A tool that found nothing (LangChain sends its [] as is), or an answer of calls only.
            if info.data.get("role") in ("tool", "assistant"):
                return ""
            raise ValueError("an empty list of content parts: send at least one part, or a string")
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"content parts of type '{kind}' are not supported (only 'text')")
            if not isinstance(part.get("text"), str):
                raise ValueError("a 'text' content part needs a string 'text'")
            other = sorted(set(part) - {"type", "text"})
            if other:  # e.g. cache_control, which LiteLLM passes on: it would do nothing here
                raise ValueError(f"a text content part has only 'type' and 'text', not {other[0]!r}")
            texts.append(part["text"])
        return "\n".join(texts)

    @field_validator("audio", "function_call")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        return refuse_unless(value, (None,), "not supported by this server (use content and tool_calls)")

    @field_validator("refusal", "annotations")
    @classmethod
    def _sent_back_empty(cls, value: Any) -> Any:
        # What an answer from this server carries (the SDK sends a returned message back whole).
        return refuse_unless(value, (None, []), "only null here: answers from this server carry none")

    @model_validator(mode="after")
    def _has_content(self) -> OpenAIMessage:
        if (problem := turn_problem(self.role, self.content is not None, bool(self.tool_calls))) is not None:
            raise ValueError(problem)
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs the 'tool_call_id' of the call it answers")
        return self

    def chat_message(self) -> dict[str, Any]:
        """streamq's message (a ``developer`` message is a system message)."""
        message = ChatMessage(
            role="system" if self.role == "developer" else self.role,
            content=self.content or "",
            name=self.name,
            tool_calls=self.tool_calls or None,
            tool_call_id=self.tool_call_id,
        )
        return message.model_dump(exclude_none=True)


class StreamObfuscation(BaseModel):
    """``stream_options`` as the Responses API has them (and the chat route, with usage)."""

    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = Field(
        None, strict=True, description="streamq pads nothing: only false"
    )

    @field_validator("include_obfuscation")
    @classmethod
    def _no_obfuscation(cls, value: bool | None) -> bool | None:
        return refuse_unless(value, (None, False), "stream obfuscation is not offered by this server")


class StreamOptions(StreamObfuscation):
    include_usage: bool = Field(False, strict=True)


class OpenAIFields(SamplingFields):
    """What chat and text completions share: sampling (as the job API), OpenAI's extras and
    streamq's detach flag."""

    model_config = ConfigDict(extra="forbid")

    n: int | None = Field(None, strict=True, description="number of choices: streamq makes exactly 1")
    stream: bool = Field(False, strict=True, description="true: server-sent events (null: false)")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="the end user's id (logged with the job id)")
    safety_identifier: str | None = Field(None, description="the end user's id (logged with the job id)")
    metadata: Metadata = Field(None, description="logged with the job id (16 pairs at most)")
    service_tier: ServiceTier = Field(None, description="'auto' or 'default': one tier here")
    store: bool | None = Field(
        None, strict=True, description="stored completions are not offered: only false"
    )
    prompt_cache_key: str | None = Field(
        None, description="accepted: prompt caching needs no key here (vLLM caches prefixes itself)"
    )
    background: bool = Field(
        False,
        strict=True,
        description="keep the job running when the client goes away (header X-Streamq-Detach: 1)",
    )

    @field_validator("stream", mode="before")
    @classmethod
    def _null_is_false(cls, value: Any) -> Any:
        return False if value is None else value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        return refuse_unless(
            value, (None, 1), f"only n=1 is supported (one choice per request; send n requests), got {value}"
        )

    @field_validator("store")
    @classmethod
    def _not_stored(cls, value: bool | None) -> bool | None:
        return refuse_unless(
            value, (None, False), "stored completions are not offered (use background jobs: /v1/jobs)"
        )

    @model_validator(mode="after")
    def _options_of_a_stream(self) -> OpenAIFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("'stream_options' goes with 'stream': true")
        return self

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def end_user(self) -> str | None:
        return self.user or self.safety_identifier

    def _job_request(self, **fields: Any) -> JobRequest:
        """The job request: these sampling fields plus ``fields``; a 400 if it is not valid."""
        sampling = self.model_dump(include=set(SamplingFields.model_fields), exclude_none=True)
        try:
            return JobRequest.model_validate(sampling | fields)
        except ValidationError as exc:
            where, message = first_error(exc)
            raise ApiError(400, message, param=where) from None


class ChatCompletionRequest(OpenAIFields):
    """Body of ``POST /v1/chat/completions``."""

    _plan: ToolPlan | None = PrivateAttr(None)
    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True, description="wins over max_tokens")
    logprobs: bool | None = Field(None, strict=True, description="each answer token's log probability")
    top_logprobs: LogprobCount = Field(None, description="with logprobs: the likeliest tokens at each place")
    tools: list[ToolDefinition] | None = Field(None, description="functions the model may call")
    tool_choice: ToolChoice | None = Field(
        None, description="none, auto (default with tools), required, or one"
    )
    parallel_tool_calls: bool | None = Field(
        None, strict=True, description="false: at most one call per answer"
    )
    modalities: list[Literal["text"]] | None = Field(None, description="only text")
    audio: Any = Field(None, description="not supported: refused unless null")
    prediction: Any = Field(None, description="not supported: refused unless null")
    reasoning_effort: Any = Field(None, description="not supported: refused unless null")
    verbosity: Any = Field(None, description="not supported: refused unless null")
    web_search_options: Any = Field(None, description="not supported: refused unless null")
    functions: Any = Field(None, description="deprecated: use tools")
    function_call: Any = Field(None, description="deprecated: use tool_choice")

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choices_only(cls, value: Any) -> Any:
        """A choice of another type (OpenAI's ``custom`` tools, ``allowed_tools``) is refused by its
        type, rather than as an unknown field that comes with it."""
        kind = value.get("type") if isinstance(value, dict) else None
        if isinstance(kind, str) and kind != "function":
            raise ValueError(
                f"a tool_choice of type {json.dumps(kind)} is not supported: only 'none', 'auto', "
                "'required' or a function"
            )
        return value

    @field_validator(
        "audio",
        "prediction",
        "reasoning_effort",
        "verbosity",
        "web_search_options",
        "functions",
        "function_call",
    )
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        return refuse_unless(value, (None,), "not supported by this server")

    @model_validator(mode="after")
    def _logprobs_asked(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("'top_logprobs' needs 'logprobs': true")
        return self

    def tool_plan(self) -> ToolPlan:
        """The request's tool plan, made once (it checks the forced functions' schemas)."""
        if self._plan is None:
            if self.parallel_tool_calls is not None and not self.tools:  # as OpenAI refuses it
                message = "'parallel_tool_calls' is only allowed when 'tools' are specified"
                raise ApiError(400, message, param="parallel_tool_calls")
            self._plan = plan_tools(self.tools, self.tool_choice, self.parallel_tool_calls)
        return self._plan

    def max_tokens_param(self) -> str:
        """The field that set the answer's length, as sent (errors name it)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    def job_request(self) -> JobRequest:
        if (problem := tool_turn_problem(self.messages)) is not None:
            param = f"messages.{problem.index}.{problem.field}"
            raise ApiError(400, problem.message, param=param)
        fields: dict[str, Any] = {"messages": [m.chat_message() for m in self.messages]}
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        if self.logprobs:
            fields["logprobs"] = self.top_logprobs or 0
        plan = self.tool_plan()
        return self._job_request(**fields, **plan.job_fields(self.stop)).forcing_a_call(plan.forces_call)


# Job-request fields as OpenAI's chat requests name them (a refusal names what the client sent).
CHAT_PARAMS = {"logprobs": "logprobs", "tools": "tools", "max_tokens": "max_tokens"}
