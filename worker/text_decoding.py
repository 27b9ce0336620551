"""Turning generated token ids into text deltas: whole characters only, stop sequences held back."""

from __future__ import annotations

from typing import Any

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDecoder:
    """Decodes a growing list of token ids into text deltas without splitting a character.

    A byte-level token may end in the middle of a multi-byte UTF-8 character; the tokenizer
    then decodes it as U+FFFD. Such text is held back until the following tokens complete the
    character. Decoding a small window (prefix offset .. end) keeps each step cheap and gives
    the same text as decoding everything at once (the method vLLM and TGI use).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def _decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        current = self._decode(self.ids[self._prefix_offset :])
        if len(current) > len(prefix) and not current.endswith(REPLACEMENT_CHAR):
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
            return current[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Whatever text is still held back (at the end of generation)."""
        prefix = self._decode(self.ids[self._prefix_offset : self._read_offset])
        current = self._decode(self.ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self.ids)
        return current[len(prefix) :]


class StopMatcher:
    """Finds stop sequences in streamed text, holding back any tail that could start one.

    ``push`` returns the text safe to emit and whether a stop sequence was reached; the stop
    sequence itself and anything after it are never emitted.
    """

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._pending = ""

    def push(self, text: str) -> tuple[str, bool]:
        if not self._stops:
            return text, False
        buffer = self._pending + text
        hits = [i for i in (buffer.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._pending = ""
            return buffer[: min(hits)], True
        hold = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(buffer)), hold, -1):
                if buffer.endswith(stop[:size]):
                    hold = size
                    break
        self._pending = buffer[len(buffer) - hold :] if hold else ""
        return buffer[: len(buffer) - hold], False

    def flush(self) -> str:
        """The held-back tail, released when generation ends without reaching a stop."""
        pending, self._pending = self._pending, ""
        return pending
