"""The ``data`` of each event in a job's stream, as typed models, and its JSON encoding.

Writers build these models; the front relays the stored JSON to clients as it is (no parse on
the hot path), and readers that need a field parse it with the same model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from shared.logprobs import TokenLogprob
from shared.schemas import DoneEvent, JobError

# Characters some line readers take for line breaks (str.splitlines, httpx's iter_lines, old JS
# engines); SSE does not, but a client that does would cut the event. JSON may escape them.
_LINE_SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
_SEPARATOR = re.compile("[\u2028\u2029\x85]")


def encode(data: Mapping[str, Any] | None) -> str:
    """JSON for an event's ``data`` field: UTF-8 as is, but U+2028, U+2029 and U+0085 escaped."""
    text = json.dumps(data or {}, separators=(",", ":"), ensure_ascii=False)
    return _SEPARATOR.sub(lambda m: _LINE_SEPARATORS[m.group()], text)


class Payload(BaseModel):
    """An event's data. Only the fields given are written (``exclude_unset``), so an explicit
    None is sent as null and a field left out is absent, as clients of each event expect."""

    model_config = ConfigDict(extra="allow")  # a reader takes events from newer writers too

    def encode(self) -> str:
        return encode(self.model_dump(mode="json", exclude_unset=True))


class Queued(Payload):
    """``queued``: written on submit ({model}) and by a handback ({requeued, attempt}); the front
    adds the job's live place in its queue and the wait it means when it relays one."""

    model: str | None = None
    requeued: bool | None = None
    attempt: int | None = None
    position: int | None = None
    estimated_wait_seconds: float | None = None


class Started(Payload):
    worker: str  # the slot (worker name and slot number) running it
    attempt: int


class Delta(Payload):
    """``delta``: new text; with logprobs asked, each new token's (they may come before the text
    they spell, which a stop sequence can hold back); the prompt's, once, before any text."""

    text: str
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None


class Done(Payload, DoneEvent):
    """``done``: finish_reason, usage, timings."""


class Failed(Payload, JobError):
    """``error``: {type, message}."""


class Canceled(Payload):
    completion_tokens: int = 0
