"""Request and response models shared by the front and the workers."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from shared.job_store.vocabulary import FINAL_EVENTS, EventName, FinishReason, JobStatus
from shared.logprobs import MAX_LOGPROBS, MAX_PROMPT_LOGPROBS


def _encodable(value: str) -> str:
    """Refuse text that is not valid Unicode (lone surrogates such as "\\ud800" in JSON)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("text must be valid Unicode (it holds a lone surrogate)") from None
    return value


Text = Annotated[str, AfterValidator(_encodable)]


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Text
    arguments: Text = Field(description="the call's arguments: a JSON object, as text (OpenAI's form)")


class ToolCall(BaseModel):
    """A call an assistant made, as OpenAI writes it in ``message.tool_calls``."""

    model_config = ConfigDict(extra="ignore")

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """One turn of a conversation. ``tool`` turns answer an assistant's ``tool_calls``."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: Text = ""
    name: Text | None = None  # the speaker's (or a tool turn's function) name, for the template
    tool_calls: list[ToolCall] | None = None  # assistant turns only
    tool_call_id: Text | None = None  # tool turns only: the call this answers

    def template_turn(self) -> dict[str, Any]:
        """The turn as Hugging Face chat templates take it: a call's arguments as an object."""
        turn: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            turn["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": _arguments(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.tool_call_id is not None:
            turn["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            turn["name"] = self.name
        return turn


def _arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")]
    description: Text | None = None
    parameters: dict[str, Any] | None = Field(None, description="JSON Schema of the arguments")
    strict: bool | None = None


class ToolDefinition(BaseModel):
    """A function the model may call (OpenAI's ``tools`` entries; only ``function`` tools)."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["function"]
    function: FunctionDefinition


# What some engines can do and others cannot: a request that needs one goes only to workers
# whose engine offers it (the front refuses it with a 400 naming the field otherwise).
PENALTIES = "penalties"
LOGIT_BIAS = "logit_bias"
STRUCTURED_OUTPUT = "structured_output"
LOGPROBS = "logprobs"  # log probabilities of the answer's tokens (and the most likely others)
PROMPT_LOGPROBS = "prompt_logprobs"  # ... and of the prompt's tokens
RAW_PROMPT = "raw_prompt"  # a prompt given to the model as is (text or token ids), no chat template
TOOLS = "tools"  # the chat template takes tool definitions, and calls come back as <tool_call>
ENGINE_FEATURES = frozenset(
    {PENALTIES, LOGIT_BIAS, STRUCTURED_OUTPUT, LOGPROBS, PROMPT_LOGPROBS, RAW_PROMPT, TOOLS}
)


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON Schema the answer follows")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("'json_schema' goes with type 'json_schema', and that type needs it")
        return self


class SamplingFields(BaseModel):
    """The sampling settings every job request takes (job API and the seed's API)."""

    model_config = ConfigDict(extra="ignore")

    model: Text | None = Field(None, description="served model name; optional when one model is served")
    max_tokens: int | None = Field(None, ge=1, strict=True, description="most new tokens to generate")
    max_length: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="ChatGLM's limit: prompt tokens + new tokens (must exceed the prompt)",
    )
    temperature: float | None = Field(None, ge=0, le=2, strict=True, description="0 means greedy")
    top_p: float | None = Field(None, gt=0, le=1, strict=True)
    top_k: int | None = Field(None, ge=0, strict=True, description="0 means no top-k cut")
    stop: Text | list[Text] | None = Field(None, description="text that ends the answer (not included)")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, strict=True)
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, description="penalize tokens already in the answer (vLLM engine)"
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, description="penalize tokens by how often they are in the answer (vLLM engine)"
    )
    repetition_penalty: float | None = Field(
        None, gt=0, le=2, description="(extension) divide repeated tokens' scores by this (vLLM engine)"
    )
    logit_bias: dict[str, float] | None = Field(
        None, description="token id (a string) → bias from -100 to 100 added to its score (vLLM engine)"
    )
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: the answer is JSON (vLLM engine, grammar-constrained)"
    )
    queue_ttl: int | None = Field(
        None, ge=1, strict=True, description="seconds the job may wait in its queue (at most the server's)"
    )
    timeout: int | None = Field(
        None, ge=1, strict=True, description="seconds the job may run, then it ends (finish_reason timeout)"
    )

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"a logit bias is from -100 to 100, got {bias} for token {token}")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        items = [value] if isinstance(value, str) else (value or [])
        if any(item == "" for item in items):
            raise ValueError("stop sequences must not be empty")
        return value


class JobRequest(SamplingFields):
    """Body of ``POST /v1/jobs``: OpenAI-style ``messages``, ChatGLM's ``prompt`` + ``history``,
    or a ``raw_prompt`` given to the model as it is. A field it does not know is refused (400,
    naming it), not ignored."""

    model_config = ConfigDict(extra="forbid")

    messages: list[ChatMessage] | None = None
    prompt: Text | None = None
    history: list[tuple[Text, Text]] | None = Field(
        None, description="ChatGLM history: [[query, response], ...]; only with prompt"
    )
    raw_prompt: Text | list[Annotated[int, Field(ge=0, strict=True)]] | None = Field(
        None, description="text or token ids given to the model as they are: no chat template"
    )
    tools: list[ToolDefinition] | None = Field(
        None, description="functions the model may call: given to its chat template (with messages)"
    )
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_LOGPROBS,
        strict=True,
        description="give each answer token's log probability and this many most likely tokens",
    )
    prompt_logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_PROMPT_LOGPROBS,
        strict=True,
        description="the same for the prompt's tokens (the first has none)",
    )

    @model_validator(mode="after")
    def _check_input(self) -> JobRequest:
        given = [name for name in ("messages", "prompt", "raw_prompt") if getattr(self, name) is not None]
        if not given:
            raise ValueError("give either 'messages' or 'prompt' (or 'raw_prompt')")
        if len(given) > 1:
            raise ValueError(f"give one of 'messages', 'prompt' and 'raw_prompt', not both ({given})")
        if self.history and self.prompt is None:
            raise ValueError("'history' goes with 'prompt'; put earlier turns in 'messages' instead")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("'messages' must not be empty")
            if self.messages[-1].role not in ("user", "tool"):
                raise ValueError("the last message must have role 'user' (or 'tool')")
        if self.raw_prompt is not None and not self.raw_prompt:
            raise ValueError("'raw_prompt' must not be empty")
        if self.tools is not None and self.messages is None:
            raise ValueError("'tools' go with 'messages' (the chat template renders them)")
        return self

    def chat_messages(self) -> list[ChatMessage]:
        """The conversation as OpenAI-style messages, whichever form it came in ([] for a raw
        prompt)."""
        if self.messages is not None:
            return list(self.messages)
        if self.raw_prompt is not None:
            return []
        turns: list[ChatMessage] = []
        for query, response in self.history or []:
            turns.append(ChatMessage(role="user", content=query))
            turns.append(ChatMessage(role="assistant", content=response))
        turns.append(ChatMessage(role="user", content=self.prompt or ""))
        return turns


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
        return sum(len(m.model_dump_json()) for m in self.messages) + len(
            json.dumps([t.model_dump() for t in self.tools or []])
        )


class GenerationRequest(PromptInput):
    """What a worker needs to run a job: stored with the job, resolved against server limits."""

    max_tokens: int
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
    logprobs: int | None = None  # None: no log probabilities; k: the token's and the k likeliest
    prompt_logprobs: int | None = None  # the same for the prompt's tokens

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
        if self.logprobs is not None:
            needed[LOGPROBS] = "logprobs"
        if self.prompt_logprobs is not None:
            needed[PROMPT_LOGPROBS] = "prompt_logprobs"
        if self.raw:
            needed[RAW_PROMPT] = "raw_prompt"
        if self.tools:
            needed[TOOLS] = "tools"
        return needed


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class JobError(BaseModel):
    type: str
    message: str


class JobView(BaseModel):
    """The state of one job as ``GET /v1/jobs/{id}`` shows it. Times are unix seconds."""

    id: str
    model: str
    status: JobStatus
    position: int | None = Field(None, description="0-based place in the model's queue while queued")
    estimated_wait_seconds: float | None = Field(
        None, description="while queued: (position + 1) / the model's drain rate; null when unknown"
    )
    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage = Field(default_factory=Usage)
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    worker: str | None = None
    error: JobError | None = None


class Timings(BaseModel):
    queue_seconds: float
    first_token_seconds: float | None
    generation_seconds: float
    tokens_per_second: float | None


class DoneEvent(BaseModel):
    finish_reason: FinishReason
    usage: Usage
    timings: Timings


class StreamEvent(BaseModel):
    """One event of ``GET /v1/jobs/{id}/events`` as a client reads it: ``queued`` (position),
    ``started``, ``delta`` ({text}), then one of ``done`` / ``error`` / ``canceled``. ``id`` is the
    event's stream entry id (the Last-Event-ID to resume from); None for a live position update."""

    id: str | None = None
    event: str
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.event in FINAL_EVENTS

    @property
    def text(self) -> str:
        """A delta's text ("" for other events)."""
        return str(self.data.get("text") or "") if self.event == EventName.DELTA else ""

    @property
    def position(self) -> int | None:
        """A ``queued`` event's 0-based place in the queue (None when unknown or another event)."""
        value = self.data.get("position") if self.event == EventName.QUEUED else None
        return value if isinstance(value, int) else None

    def done(self) -> DoneEvent | None:
        return DoneEvent.model_validate(self.data) if self.event == EventName.DONE else None

    def job_error(self) -> JobError | None:
        return JobError.model_validate(self.data) if self.event == EventName.ERROR else None
