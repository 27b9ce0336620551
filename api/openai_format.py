"""OpenAI's response objects, built from a streamq job: ``chat.completion`` and its
``chat.completion.chunk`` stream, ``text_completion`` (both forms), the model list, and the
Server-Sent Events framing of the streams. A completion's id is the job id with OpenAI's
prefix (``chatcmpl-<job id>``, ``cmpl-<job id>``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from shared.job_store.payloads import encode

Kind = Literal["chat", "text"]
DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"
_PREFIX: dict[Kind, str] = {"chat": "chatcmpl-", "text": "cmpl-"}


def sse_data(obj: dict[str, Any]) -> bytes:
    """One ``data:`` event, as OpenAI sends them (no event name, no id)."""
    return b"data: " + encode(obj).encode() + b"\n\n"


def openai_finish_reason(reason: str) -> str:
    """OpenAI knows ``stop`` and ``length``: an answer cut by any other limit (a time limit) is
    reported as ``length``."""
    return "stop" if reason == "stop" else "length"


def openai_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    prompt = int((usage or {}).get("prompt_tokens", 0))
    completion = int((usage or {}).get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


@dataclass(frozen=True)
class CompletionFormat:
    """The objects of one completion (chat or text) answered by job ``job_id``."""

    kind: Kind
    job_id: str
    model: str
    created: int
    include_usage: bool = False  # streams: usage null on every chunk, then a usage chunk

    @property
    def id(self) -> str:
        return _PREFIX[self.kind] + self.job_id

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def response(self, text: str, finish_reason: str, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The whole answer (non-streaming)."""
        reason = openai_finish_reason(finish_reason)
        choice: dict[str, Any]
        if self.kind == "chat":
            message = {"role": "assistant", "content": text, "refusal": None}
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": reason}
            obj = "text_completion"
        return self._head(obj) | {"choices": [choice], "usage": openai_usage(usage)}

    def _chunk(self, content: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        choice: dict[str, Any]
        if self.kind == "chat":
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if content is not None:
                delta["content"] = content
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            chunk = self._head("chat.completion.chunk") | {"choices": [choice]}
        else:
            choice = {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish_reason}
            chunk = self._head("text_completion") | {"choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def first_chunk(self) -> dict[str, Any] | None:
        """What a stream opens with: the assistant's role (chat; text completions have none)."""
        return self._chunk("", None, role=True) if self.kind == "chat" else None

    def delta_chunk(self, text: str) -> dict[str, Any]:
        return self._chunk(text, None)

    def final_chunk(self, finish_reason: str) -> dict[str, Any]:
        return self._chunk(None if self.kind == "chat" else "", openai_finish_reason(finish_reason))

    def usage_chunk(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._head(obj) | {"choices": [], "usage": openai_usage(usage)}


def model_list(models: dict[str, float]) -> dict[str, Any]:
    """``GET /v1/models``: served name → when its longest-running live worker started."""
    return {"object": "list", "data": [model_object(name, since) for name, since in sorted(models.items())]}


def model_object(name: str, since: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(since), "owned_by": "streamq"}
