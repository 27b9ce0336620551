"""OpenAI's response objects, built from a streamq job: ``chat.completion`` and its
``chat.completion.chunk`` stream, ``text_completion`` (both forms), the model list, and the
Server-Sent Events framing of the streams. A completion's id is the job id with OpenAI's
prefix (``chatcmpl-<job id>``, ``cmpl-<job id>``).

A job's ``delta`` events carry its text, and when asked its tokens' log probabilities (chat's
entry shape: token, logprob, bytes, top_logprobs) and the prompt's; ``CompletionStream`` turns
them into chunks (tool calls read from the text, see ``api.tool_calls``), and ``response``
into a whole answer. Text completions give logprobs in the legacy shape (tokens,
token_logprobs, top_logprobs, text_offset), and with ``echo`` begin with the prompt.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Any, Literal

from api.tool_calls import ToolCallReader, ToolPlan, cut_short, read_whole
from shared.job_store.payloads import encode

Kind = Literal["chat", "text"]
DONE = b"data: [DONE]\n\n"
PING = b": ping\n\n"
_PREFIX: dict[Kind, str] = {"chat": "chatcmpl-", "text": "cmpl-"}
Entry = dict[str, Any]  # one token's logprob entry, as a delta event carries it


def sse_data(obj: dict[str, Any]) -> bytes:
    """One ``data:`` event, as OpenAI sends them (no event name, no id)."""
    return b"data: " + encode(obj).encode() + b"\n\n"


def openai_finish_reason(reason: str, called: bool = False) -> str:
    """OpenAI knows ``stop``, ``length`` and ``tool_calls``: an answer cut by any other limit (a
    time limit) is reported as ``length``."""
    if reason != "stop":
        return "length"
    return "tool_calls" if called else "stop"


def openai_usage(usage: dict[str, Any] | None) -> dict[str, int]:
    prompt = int((usage or {}).get("prompt_tokens", 0))
    completion = int((usage or {}).get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _entry_bytes(entry: Entry) -> bytes:
    raw = entry.get("bytes")
    return bytes(raw) if raw is not None else str(entry.get("token", "")).encode()


def entries_text(entries: list[Entry]) -> str:
    """The text the entries' tokens spell: their bytes joined, then decoded (a character may
    span two tokens)."""
    return b"".join(_entry_bytes(e) for e in entries).decode("utf-8", errors="replace")


class TextOffsets:
    """Where each token's text begins in the answer: the characters its predecessors' bytes
    make, as the answer's text decodes them (errors replaced: bytes that make no character are
    the U+FFFD each group becomes). A character split between tokens begins where the token that
    finishes it does; a U+FFFD belongs to the token whose bytes it replaces, wherever the decoder
    noticed it."""

    def __init__(self, echo: str = "") -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._chars = 0
        self.echo = echo  # the prompt text the answer begins with (echo), where it has one

    def next(self, entry: Entry) -> int:
        raw = _entry_bytes(entry)
        held, _ = self._decoder.getstate()  # bytes the decoder has not decided on yet
        token = str(entry.get("token") or "")
        if not raw and not held and token and self.echo.startswith(token, self._chars):
            # A special token the echoed prompt spells (``<|im_start|>``): no bytes, as in an
            # answer's text, which leaves it out; the prompt's text has it, as its name.
            self._chars += len(token)
            return self._chars - len(token)
        at = self._chars + (_ending_within(held, raw[:4]) if held and raw else 0)
        self._chars += len(self._decoder.decode(raw))
        return at


def _ending_within(held: bytes, more: bytes) -> int:
    """How many characters of ``held + more`` (as decoded with errors replaced) end within
    ``held``: what the held bytes turn out to be before the next token's own text."""
    return sum(1 for end in _character_ends(held + more) if end <= len(held))


def _character_ends(data: bytes) -> list[int]:
    """The byte index just past each character that ``data`` decodes to, errors replaced (one
    U+FFFD for each group of bytes the decoder refuses, as ``errors="replace"`` makes it)."""
    ends: list[int] = []
    at = 0
    while at < len(data):
        try:
            text, bad = data[at:].decode("utf-8"), None
        except UnicodeDecodeError as exc:
            text, bad = data[at : at + exc.start].decode("utf-8"), exc
        for char in text:
            at += len(char.encode("utf-8"))
            ends.append(at)
        if bad is not None:
            at += bad.end - bad.start
            ends.append(at)
    return ends


def text_logprobs(entries: list[Entry], offsets_from: TextOffsets | None = None) -> dict[str, Any]:
    """Legacy completions' logprobs for ``entries`` (after those ``offsets_from`` has seen, in a
    stream): the chosen token is among each place's top_logprobs, as vLLM and OpenAI give them."""
    where = offsets_from or TextOffsets()
    tokens: list[str] = []
    logprobs: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for entry in entries:
        tokens.append(_legacy_token(entry))
        logprobs.append(entry["logprob"])
        if entry["logprob"] is None:  # a prompt's first token
            tops.append(None)
        else:
            top = {_legacy_token(alt): alt["logprob"] for alt in entry.get("top_logprobs", [])}
            top.setdefault(_legacy_token(entry), entry["logprob"])
            tops.append(top)
        offsets.append(where.next(entry))
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _legacy_token(entry: Entry) -> str:
    """A token as OpenAI's legacy completions name it: its text, or where its bytes are part of
    a character only, ``bytes:\\xe4\\xbd`` (each such token its own key in ``top_logprobs``,
    where their text, U+FFFD alike, would make them one)."""
    raw = bytes(entry.get("bytes") or [])
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return str(entry["token"])


def chat_logprobs(entries: list[Entry]) -> dict[str, Any]:
    return {"content": entries, "refusal": None}


@dataclass(frozen=True)
class CompletionFormat:
    """The objects of one completion (chat or text) answered by job ``job_id``."""

    kind: Kind
    job_id: str
    model: str
    created: int
    include_usage: bool = False  # streams: usage null on every chunk, then a usage chunk
    logprobs: bool = False  # the request asked for logprobs
    tools: ToolPlan = field(default_factory=ToolPlan)  # chat: how its text is read back
    echo: str | None = None  # text: the answer begins with this prompt text ("" : from its tokens)
    prompt_only: bool = False  # text: max_tokens 0 with echo, the prompt alone (the answer is left out)
    max_tokens_param: str = "max_tokens"  # the name the client gave the answer's length (errors)

    @property
    def id(self) -> str:
        return _PREFIX[self.kind] + self.job_id

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _echo(self, prompt_entries: list[Entry] | None) -> tuple[str, list[Entry]]:
        """The prompt an echoing answer begins with, and its entries."""
        if self.echo is None:
            return "", []
        entries = prompt_entries or []
        return (self.echo or entries_text(entries)), entries

    def response(
        self,
        text: str,
        finish_reason: str,
        usage: dict[str, Any] | None,
        entries: list[Entry] | None = None,
        prompt_entries: list[Entry] | None = None,
    ) -> dict[str, Any]:
        """The whole answer (non-streaming)."""
        choice: dict[str, Any]
        if self.kind == "chat":
            content, calls = read_whole(self.tools, self.job_id, text, cut=cut_short(finish_reason))
            message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
            if calls:
                message["tool_calls"] = calls
            logprobs = chat_logprobs(entries or []) if self.logprobs else None
            reason = openai_finish_reason(finish_reason, bool(calls))
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": reason}
            obj = "chat.completion"
        else:
            if self.prompt_only:
                text, entries, finish_reason = "", [], "length"
            prefix, echoed = self._echo(prompt_entries)
            offsets = TextOffsets(prefix)
            logprobs = text_logprobs(echoed + (entries or []), offsets) if self.logprobs else None
            reason = openai_finish_reason(finish_reason)
            choice = {"index": 0, "text": prefix + text, "logprobs": logprobs, "finish_reason": reason}
            obj = "text_completion"
        return self._head(obj) | {"choices": [choice], "usage": self.usage(usage)}

    def usage(self, usage: dict[str, Any] | None) -> dict[str, int]:
        """OpenAI's usage: the prompt's tokens, and the answer's (none left out: ``prompt_only``)."""
        if self.prompt_only:
            usage = {**(usage or {}), "completion_tokens": 0}
        return openai_usage(usage)

    def chunk(
        self, delta: dict[str, Any] | str, finish_reason: str | None = None, logprobs: Any = None
    ) -> Any:
        """One chunk: a chat ``delta`` or a text completion's text."""
        choice: dict[str, Any]
        if self.kind == "chat":
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            chunk = self._head("chat.completion.chunk") | {"choices": [choice]}
        else:
            choice = {"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish_reason}
            chunk = self._head("text_completion") | {"choices": [choice]}
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage_chunk(self, usage: dict[str, Any] | None) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._head(obj) | {"choices": [], "usage": self.usage(usage)}


class CompletionStream:
    """The chunks of one streamed completion, from the job's events as they come."""

    def __init__(self, fmt: CompletionFormat) -> None:
        self.fmt = fmt
        self._reader = ToolCallReader(fmt.tools, fmt.job_id)
        self._offsets = TextOffsets()  # text completions: each token's text_offset
        self._echoed = fmt.echo is None

    def first(self) -> list[dict[str, Any]]:
        """What a stream opens with: the assistant's role (chat; text completions have none), with
        no content where the answer is a forced call (as OpenAI's, and as its whole answer has)."""
        if self.fmt.kind != "chat":
            return []
        return [self.fmt.chunk({"role": "assistant", "content": None if self.fmt.tools.forces_call else ""})]

    def delta(self, data: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks of one ``delta`` event's data."""
        text = str(data.get("text") or "")
        entries: list[Entry] = list(data.get("logprobs") or [])
        if self.fmt.kind == "chat":
            deltas = self._reader.feed(text)
            if self.fmt.logprobs and entries:
                if not deltas:
                    deltas = [{}]
                return [self.fmt.chunk(deltas[0], logprobs=chat_logprobs(entries))] + [
                    self.fmt.chunk(d) for d in deltas[1:]
                ]
            return [self.fmt.chunk(d) for d in deltas]
        if self.fmt.prompt_only:
            text, entries = "", []
        if not self._echoed and (data.get("prompt_logprobs") is not None or text or entries):
            prefix, echoed = self.fmt._echo(data.get("prompt_logprobs"))
            self._echoed, self._offsets.echo = True, prefix
            text, entries = prefix + text, echoed + entries
        if not text and not (self.fmt.logprobs and entries):
            return []
        logprobs = text_logprobs(entries, self._offsets) if self.fmt.logprobs else None
        return [self.fmt.chunk(text, logprobs=logprobs)]

    def end(self, finish_reason: str, usage: dict[str, Any] | None) -> list[dict[str, Any]]:
        """The chunks that end the answer: held-back text or calls, the finish reason, the usage."""
        chunks: list[dict[str, Any]] = []
        if self.fmt.kind == "chat":
            chunks += [self.fmt.chunk(d) for d in self._reader.finish(cut=cut_short(finish_reason))]
            reason = openai_finish_reason(finish_reason, self._reader.calls > 0)
            chunks.append(self.fmt.chunk({}, reason))
        else:
            if not self._echoed:
                chunks += self.delta({"text": ""} | {"prompt_logprobs": []})
            finish_reason = "length" if self.fmt.prompt_only else finish_reason
            chunks.append(self.fmt.chunk("", openai_finish_reason(finish_reason)))
        if self.fmt.include_usage:
            chunks.append(self.fmt.usage_chunk(usage))
        return chunks


def model_list(models: dict[str, float]) -> dict[str, Any]:
    """``GET /v1/models``: served name → when its longest-running live worker started."""
    return {"object": "list", "data": [model_object(name, since) for name, since in sorted(models.items())]}


def model_object(name: str, since: float) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(since), "owned_by": "streamq"}
