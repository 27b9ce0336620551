"""The job API's request (``POST /v1/jobs``) and the sampling settings every job request takes."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    field_validator,
    model_validator,
)

from shared.digits import ascii_digits
from shared.logprobs import MAX_PROMPT_LOGPROBS, LogprobCount
from shared.schemas.json_schema_check import UsableSchema
from shared.schemas.messages import ChatMessage, Text, ToolDefinition, whole_turn

# A structured output's name, as OpenAI takes it (letters, digits, '_' and '-'; 64 at most).
FormatName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


class JsonSchemaFormat(BaseModel):
    """OpenAI's ``json_schema`` format: its fields, each required where OpenAI requires it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: FormatName
    description: str | None = Field(
        None, description="accepted; the schema alone holds the answer (it is not given to the model)"
    )
    schema_: UsableSchema = Field(alias="schema", description="the JSON Schema the answer follows")
    strict: bool | None = Field(
        None, strict=True, description="accepted: the answer always follows the schema"
    )


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

    # NaN and infinities (which Python's JSON reads) are "not a finite number", not out of range.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text | None = Field(None, description="served model name; optional when one model is served")
    max_tokens: int | None = Field(None, ge=1, strict=True, description="most new tokens to generate")
    max_length: int | None = Field(
        None,
        ge=1,
        strict=True,
        description="ChatGLM's limit: prompt tokens + new tokens (must exceed the prompt)",
    )
    temperature: float | None = Field(None, ge=0, le=2, strict=True, description="0 means greedy")
    top_p: float | None = Field(
        None, ge=0, le=1, strict=True, description="0 keeps only the most likely token, as OpenAI takes it"
    )
    top_k: int | None = Field(None, ge=0, strict=True, description="0 means no top-k cut")
    stop: Text | list[Text] | None = Field(None, description="text that ends the answer (not included)")
    seed: int | None = Field(
        None,
        ge=-(2**63),
        le=2**63 - 1,
        strict=True,
        description="any signed 64-bit integer, as OpenAI takes it (a negative one is its 64-bit pattern)",
    )
    presence_penalty: float | None = Field(
        None, ge=-2, le=2, strict=True, description="penalize tokens already in the answer"
    )
    frequency_penalty: float | None = Field(
        None, ge=-2, le=2, strict=True, description="penalize tokens by how often they are in the answer"
    )
    # Tiny ones overflow the scores they divide (about 1e-37 in float32: NaN probabilities, which
    # vLLM's sampler does not survive); 0.01 is far below any useful one.
    repetition_penalty: float | None = Field(
        None, ge=0.01, le=2, strict=True, description="(extension) divide repeated tokens' scores by this"
    )
    logit_bias: dict[str, Annotated[float, Field(strict=True)]] | None = Field(
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
            if not ascii_digits(token):
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

    messages: list[Annotated[ChatMessage, BeforeValidator(whole_turn)]] | None = None
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
    # Not a field: how many of the leading messages, and of their characters, a Responses chain
    # carried from its earlier turns (checked against the limits when they were sent).
    _carried: tuple[int, int] = PrivateAttr((0, 0))

    def carrying(self, earlier: list[ChatMessage]) -> JobRequest:
        """This request, its messages led by a chain's ``earlier`` turns."""
        self._carried = (len(earlier), sum(len(m.content) for m in earlier))
        return self

    @property
    def carried(self) -> tuple[int, int]:
        return self._carried

    # Not a field: its response_format is the schema of a call that tool_choice forces (the
    # OpenAI routes' required or named), so the answer is that JSON alone. Otherwise tools beside
    # a JSON response_format are served as OpenAI serves them: the answer is calls, or the JSON.
    _forced_call: bool = PrivateAttr(False)

    def forcing_a_call(self, forced: bool) -> JobRequest:
        self._forced_call = forced
        return self

    @property
    def forced_call(self) -> bool:
        return self._forced_call

    logprobs: LogprobCount = Field(
        None, description="give each answer token's log probability and this many most likely tokens"
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
            raise ValueError("'messages' or 'prompt' (or 'raw_prompt') is required")
        if len(given) > 1:
            # The param is the second: the field that should not be there beside the first.
            raise ValueError(f"'{given[1]}' cannot go with '{given[0]}': give one of them, not both")
        if self.history and self.prompt is None:
            raise ValueError("'history' goes with 'prompt'; put earlier turns in 'messages' instead")
        if self.messages is not None and not self.messages:
            raise ValueError("'messages' must not be empty")
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
