"""The body of OpenAI's ``POST /v1/responses``, turned into a streamq job request.

As on the chat route, nothing is silently ignored: every field the Responses API defines that
streamq honours is declared here, the ones it cannot honour are refused with a 400 naming them
(built-in tools, reasoning, ``include`` values, ``truncation: auto``...), and any other field is
refused as unknown (``extra="forbid"``, see ``api.errors``). The input (a string, or message,
``function_call`` and ``function_call_output`` items) becomes the job's chat messages, after
``instructions`` (a system message) and the earlier turns of a ``previous_response_id`` chain;
``text.format`` becomes ``response_format``, and function ``tools`` / ``tool_choice`` go through
``api.tool_calls.plan_tools`` exactly as on the chat route.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from api.errors import ApiError, renamed
from api.openai_schemas import Metadata, ServiceTier, StreamObfuscation, refuse_unless
from api.responses_items import InputItem, MessageItem, chat_messages, item_type, said_nothing
from api.tool_calls import NamedFunction, NamedToolChoice, ToolChoice, ToolPlan, plan_tools
from api.tool_turns import answers_after_calls, unpaired_output
from api.validation_messages import first_error
from shared.schemas import (
    ChatMessage,
    FunctionDefinition,
    JobRequest,
    JsonSchemaFormat,
    ResponseFormat,
    Text,
    ToolDefinition,
)
from shared.schemas.job_request import FormatName
from shared.schemas.json_schema_check import UsableSchema

_FORBID = ConfigDict(extra="forbid")


class FunctionTool(FunctionDefinition):
    """A function tool, in the Responses API's flat shape (``name`` beside ``type``)."""

    type: Literal["function"]

    def definition(self) -> ToolDefinition:
        """The chat route's shape of the same function."""
        function = FunctionDefinition.model_validate(self.model_dump(exclude={"type"}))
        return ToolDefinition(type="function", function=function)

    @model_validator(mode="before")
    @classmethod
    def _functions_only(cls, value: Any) -> Any:
        if item_type(value) != "function":
            raise ValueError(
                f"tools of type {item_type(value)!r} are not supported: only function tools (no built-in "
                "tools such as web_search or file_search run here)"
            )
        # As the openai SDK dumps a tool of a response it returned: fields that ask for nothing.
        nothing = (None,)
        return said_nothing(
            value,
            {
                "async": (None, False),
                "async_": (None, False),
                "defer_loading": (None, False),
                "output_schema": nothing,
                "allowed_callers": nothing,
            },
        )


class FunctionChoice(BaseModel):
    model_config = _FORBID

    type: Literal["function"]
    name: str


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    type: Literal["text", "json_object", "json_schema"]
    name: FormatName | None = None
    schema_: UsableSchema | None = Field(None, alias="schema")
    strict: bool | None = Field(None, strict=True)
    description: str | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> TextFormat:
        if (self.type == "json_schema") != (self.schema_ is not None):
            raise ValueError("'schema' goes with type 'json_schema', and that type needs it (and a 'name')")
        if self.type == "json_schema" and not self.name:
            raise ValueError("a 'json_schema' format needs a 'name'")
        return self

    def response_format(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return ResponseFormat(type="json_object")
        schema = JsonSchemaFormat.model_validate(
            {"name": self.name or "response", "schema": self.schema_ or {}, "strict": self.strict}
        )
        return ResponseFormat(type="json_schema", json_schema=schema)


class TextConfig(BaseModel):
    model_config = _FORBID

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = Field(None, description="only medium (the default)")

    @field_validator("verbosity")
    @classmethod
    def _default_verbosity(cls, value: str | None) -> str | None:
        return refuse_unless(value, (None, "medium"), "a model served here has no verbosity setting")


class ReasoningSettings(BaseModel):
    model_config = _FORBID

    effort: str | None = Field(None, description="none only: the models served here do not reason")
    summary: str | None = None
    generate_summary: str | None = None

    @field_validator("effort")
    @classmethod
    def _no_effort(cls, value: str | None) -> str | None:
        return refuse_unless(
            value, (None, "none"), "reasoning effort is not offered by the models served here"
        )

    @field_validator("summary", "generate_summary")
    @classmethod
    def _no_summary(cls, value: str | None) -> str | None:
        return refuse_unless(value, (None,), "reasoning summaries are not offered by the models served here")


# Job-request fields as the Responses API names them (a refusal names what the client sent).
RESPONSES_PARAMS = {"max_tokens": "max_output_tokens", "response_format": "text.format"}


def responses_param(param: str | None, forced_call: bool = False) -> str | None:
    """The request field behind a job request's ``param``; a forced tool call's schema is its
    ``tools``' (as on the chat route)."""
    if param is None:
        return None
    if param.split(".")[0] in ("messages", "history", "prompt"):
        return "input"
    if param.startswith("response_format") and forced_call:
        return "tools"
    if param.startswith("tools.") and ".function." in param:  # Responses' tools are flat
        return param.replace(".function.", ".", 1)
    return RESPONSES_PARAMS.get(param, param)


def named_as_sent(exc: ApiError, forced_call: bool = False) -> ApiError:
    """``exc`` naming the Responses field the client sent: its ``param``, and its message's quote."""
    sent = responses_param(exc.param, forced_call)
    renamed(exc, sent, "input")
    exc.param = sent
    return exc


class ResponsesRequest(BaseModel):
    """Body of ``POST /v1/responses``."""

    model_config = _FORBID
    _plan: ToolPlan | None = PrivateAttr(None)
    _conversation: list[ChatMessage] | None = PrivateAttr(None)  # one history per request

    model: Text | None = Field(None, description="a served model; optional when one model is served")
    input: Text | list[InputItem]
    instructions: Text | None = Field(None, description="a system message before the input (not chained)")

    @field_validator("input")
    @classmethod
    def _some_input(cls, value: str | list[InputItem]) -> str | list[InputItem]:
        if isinstance(value, list) and not value:
            raise ValueError("'input' must not be empty")
        seen: dict[str, int] = {}
        for n, item in enumerate(value if isinstance(value, list) else []):
            given = getattr(item, "id", None)
            if given is not None and seen.setdefault(given, n) != n:  # its items are listed by id
                raise ValueError(
                    f"Duplicate item found with id {given} (input.{seen[given]} and input.{n}): "
                    "remove duplicate items from your input and try again"
                )
        return value

    max_output_tokens: int | None = Field(None, ge=1, strict=True)
    temperature: float | None = Field(
        None, ge=0, le=2, strict=True, allow_inf_nan=False, description="0 means greedy"
    )
    top_p: float | None = Field(None, ge=0, le=1, strict=True, allow_inf_nan=False)
    stream: bool | None = Field(False, strict=True)
    stream_options: StreamObfuscation | None = None
    background: bool | None = Field(
        False, strict=True, description="run on when the client goes; poll or stream it later"
    )
    store: bool | None = Field(
        None, strict=True, description="false: the response cannot be continued or listed"
    )
    previous_response_id: str | None = Field(None, description="continue that response's conversation")
    metadata: Metadata = Field(None, description="kept with the response (16 pairs at most)")
    text: TextConfig | None = None
    tools: list[FunctionTool] | None = Field(None, description="function tools only")
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = Field(None, strict=True, description="false: at most one call")
    user: str | None = Field(None, description="the end user's id (logged with the job id)")
    safety_identifier: str | None = Field(None, description="the end user's id (logged with the job id)")
    prompt_cache_key: str | None = Field(None, description="accepted: no key is needed for prompt caching")
    service_tier: ServiceTier = Field(None, description="'auto' or 'default': one tier here")
    include: list[str] | None = Field(None, description="nothing more can be included: only empty")
    truncation: Literal["auto", "disabled"] | None = Field(None, description="only disabled")
    reasoning: ReasoningSettings | None = None
    top_logprobs: int | None = Field(None, strict=True, description="not offered here: only 0")
    max_tool_calls: int | None = Field(None, description="not offered: use parallel_tool_calls")
    prompt: Any = Field(None, description="stored prompts are not offered")
    conversation: Any = Field(None, description="conversations are not offered: use previous_response_id")
    prompt_cache_retention: Any = Field(None, description="not offered")

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _function_choice(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("type") != "function":
            raise ValueError(
                f"tool_choice of type {value.get('type')!r} is not supported (none, auto, required, "
                "or {'type': 'function', 'name': ...})"
            )
        return value

    @field_validator("stream_options")
    @classmethod
    def _options_of_a_stream(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and not info.data.get("stream"):
            raise ValueError("'stream_options' goes with 'stream': true")
        return value

    @field_validator("include")
    @classmethod
    def _nothing_included(cls, value: list[str] | None) -> list[str] | None:
        return refuse_unless(
            value or None, (None,), f"cannot include {value}: no such output is offered here"
        )

    @field_validator("truncation")
    @classmethod
    def _no_truncation(cls, value: str | None) -> str | None:
        return refuse_unless(value, (None, "disabled"), "truncation is not offered: a long input is a 400")

    @field_validator("top_logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        return refuse_unless(value, (None, 0), "log probabilities are not offered on /v1/responses")

    @field_validator("max_tool_calls", "prompt", "conversation", "prompt_cache_retention")
    @classmethod
    def _unsupported(cls, value: Any) -> Any:
        return refuse_unless(value, (None,), "not supported by this server")

    @field_validator("store")
    @classmethod
    def _background_is_stored(cls, value: bool | None, info: ValidationInfo) -> bool | None:
        if value is False and info.data.get("background"):
            raise ValueError("a background response is stored: it cannot have store false")
        return value

    @property
    def stored(self) -> bool:
        return self.store is not False

    def response_format(self) -> ResponseFormat | None:
        return self.text.format.response_format() if self.text and self.text.format else None

    def tool_plan(self) -> ToolPlan:
        """The request's tool plan, made once (it checks the forced functions' schemas)."""
        if self._plan is None:
            self._plan = self._new_plan()
        return self._plan

    def _new_plan(self) -> ToolPlan:
        choice: ToolChoice | None
        if isinstance(self.tool_choice, FunctionChoice):
            choice = NamedToolChoice(type="function", function=NamedFunction(name=self.tool_choice.name))
        else:
            choice = self.tool_choice
        tools = [tool.definition() for tool in self.tools or []]
        try:
            return plan_tools(tools, choice, self.parallel_tool_calls)
        except ApiError as exc:
            raise named_as_sent(exc) from None

    def items(self) -> list[InputItem]:
        """The input as items (a string is one user message)."""
        return (
            list(self.input)
            if isinstance(self.input, list)
            else [MessageItem(role="user", content=self.input)]
        )

    def leave_out(self, made: Callable[[str], bool]) -> None:
        """Leave out the input items whose ids streamq ``made`` for the chain's responses (their
        outputs, which the chain brings): an agent's loop that appends each output to its input
        and chains too sent them again, and the model read them twice. Kept once, as a call sent
        again always was (``chat_messages``); OpenAI refuses them ("Duplicate item found"). An
        input of such items only is a 400: nothing new to answer."""
        if not isinstance(self.input, list):
            return
        kept = [item for item in self.input if not made(getattr(item, "id", None) or "")]
        if not kept:
            raise ApiError(
                400,
                "every item of 'input' is one of the previous responses' own, which "
                "previous_response_id brings already: send the new items",
                param="input",
            )
        self.input = kept

    def messages(self, history: list[ChatMessage]) -> list[ChatMessage]:
        """The conversation for the job, instructions aside: ``history`` (earlier turns), then the
        input as chat messages, each function call's output right after it. A 400 (OpenAI's
        words) when an output answers no call before it, or a call has no output. Made once per
        request (the job request and the stored record both use it)."""
        if self._conversation is not None:
            return self._conversation
        conversation = chat_messages(self.items(), history)
        if (problem := unpaired_output(conversation)) is not None:
            message = f"No tool call found for function call output with call_id {problem.call_id}."
            if problem.field == "tool_calls":
                message = f"No tool output found for function call {problem.call_id}."
            raise ApiError(400, message, param="input")
        self._conversation = answers_after_calls(conversation)
        return self._conversation

    def job_request(self, history: list[ChatMessage]) -> JobRequest:
        """The job request (a 400 naming the Responses field when it is not valid)."""
        plan = self.tool_plan()
        system = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        conversation = self.messages(history)
        fields: dict[str, Any] = {
            "messages": [m.model_dump(exclude_none=True) for m in system + conversation]
        }
        for name, value in (
            ("model", self.model),
            ("max_tokens", self.max_output_tokens),
            ("temperature", self.temperature),
            ("top_p", self.top_p),
        ):
            if value is not None:
                fields[name] = value
        if (response_format := self.response_format()) is not None:
            fields["response_format"] = response_format.model_dump(by_alias=True, exclude_none=True)
        fields |= plan.job_fields(None)
        try:
            return JobRequest.model_validate(fields).carrying(history).forcing_a_call(plan.forces_call)
        except ValidationError as exc:
            where, message = first_error(exc)
            # A check of the whole request (the last turn's role) is about the conversation: the input.
            param = responses_param(where or "messages", plan.forces_call)
            raise ApiError(400, message, param=param) from None
