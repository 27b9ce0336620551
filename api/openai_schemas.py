"""Request bodies of the OpenAI-compatible routes, turned into streamq job requests.

Fields streamq does not know are ignored (clients send many); fields it knows are checked as
strictly as the job API checks them, so a bad value is a 400 that names it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from api.errors import ApiError
from shared.schemas import ChatMessage, JobRequest, SamplingFields, Text

Role = Literal["system", "developer", "user", "assistant"]


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Role
    content: Text | None = Field(
        None,
        description='a string, or a list of text parts [{"type": "text", "text": ...}] (joined by newlines)',
    )

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        texts = []
        for part in value:
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"content parts of type '{kind}' are not supported (only 'text')")
            if not isinstance(part.get("text"), str):
                raise ValueError("a 'text' content part needs a string 'text'")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _has_content(self) -> OpenAIMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self

    def chat_message(self) -> ChatMessage:
        """streamq's message (a ``developer`` message is a system message)."""
        return ChatMessage(
            role="system" if self.role == "developer" else self.role, content=self.content or ""
        )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class OpenAIFields(SamplingFields):
    """What chat and text completions share: sampling (as the job API), OpenAI's extras and
    streamq's detach flag."""

    n: int | None = Field(None, strict=True, description="number of choices: streamq makes exactly 1")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, description="the end user's id (accepted; logged with the job id)")
    background: bool = Field(
        False, description="keep the job running when the client goes away (header X-Streamq-Detach: 1)"
    )

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        if value is not None and value != 1:
            raise ValueError(f"only n=1 is supported (one choice per request), got {value}")
        return value

    @property
    def include_usage(self) -> bool:
        return self.stream and self.stream_options is not None and self.stream_options.include_usage

    def _job_request(self, **fields: Any) -> JobRequest:
        """The job request: these sampling fields plus ``fields``; a 400 if it is not valid."""
        sampling = self.model_dump(include=set(SamplingFields.model_fields), exclude_none=True)
        try:
            return JobRequest.model_validate(sampling | fields)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or None
            raise ApiError(400, str(first["msg"]).removeprefix("Value error, "), param=where) from None


class ChatCompletionRequest(OpenAIFields):
    """Body of ``POST /v1/chat/completions``."""

    messages: list[OpenAIMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, strict=True, description="wins over max_tokens")

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, value: list[OpenAIMessage]) -> list[OpenAIMessage]:
        if value and value[-1].role != "user":
            raise ValueError("the last message must have role 'user'")
        return value

    def job_request(self) -> JobRequest:
        fields: dict[str, Any] = {"messages": [m.chat_message().model_dump() for m in self.messages]}
        if self.max_completion_tokens is not None:
            fields["max_tokens"] = self.max_completion_tokens
        return self._job_request(**fields)


class CompletionRequest(OpenAIFields):
    """Body of ``POST /v1/completions``. The prompt goes to the model as one user message (the
    model's chat template applies): workers always render a conversation."""

    prompt: Text | list[Text]

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise ValueError(f"give one prompt (a string), got a list of {len(value)}")
        return value

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def job_request(self) -> JobRequest:
        return self._job_request(messages=[{"role": "user", "content": self.prompt_text()}])
