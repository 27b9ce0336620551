"""Log probabilities as a job's stream carries them: each token's text, UTF-8 bytes and log
probability, with the most likely tokens at its place (OpenAI's chat ``logprobs`` entries).

Both engines compute the numbers (from the model's raw distribution, before temperature,
penalties or a grammar change it, as vLLM and OpenAI report them); this turns token ids into
the entries. A token's bytes come from xgrammar's table of the tokenizer's vocabulary (byte-level
BPE, SentencePiece with byte fallback, and others), so the bytes of an answer's tokens join into
its text even when one token holds only part of a character.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from shared.logprobs import TokenLogprob, TopLogprob

FLOOR = -9999.0  # stands for -inf (a token the model gives no chance), which JSON cannot carry


def special_names(tokenizer: Any) -> dict[int, str]:
    """The special tokens' ids and names (``<|im_end|>``): the answer's text leaves them out."""
    names = {}
    for token_id in getattr(tokenizer, "all_special_ids", []) or []:
        names[int(token_id)] = str(tokenizer.convert_ids_to_tokens(int(token_id)))
    for token_id, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            names[int(token_id)] = str(added.content)
    return names


def vocabulary_bytes(tokenizer: Any, vocab_size: int | None = None) -> list[bytes]:
    """Every token id's bytes as it reads in an answer's text: special tokens (``<|im_end|>``),
    which the text leaves out, have none, and nor do ids past the tokenizer's vocabulary
    (padding in the model's embedding)."""
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    table = list(info.decoded_vocab)
    for token_id in special_names(tokenizer):
        if 0 <= token_id < len(table):
            table[token_id] = b""
    return table


def _number(value: float) -> float:
    return value if math.isfinite(value) else FLOOR


class TokenTexts:
    """Builds log-probability entries for one tokenizer (its vocabulary table is made on first
    use, or at start-up with ``warm``)."""

    def __init__(self, tokenizer: Any, vocab_size: int | None = None) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._bytes: list[bytes] | None = None
        self._special: dict[int, str] = {}

    def warm(self) -> TokenTexts:
        """Build the vocabulary table now (a worker does at start-up: about a second for a large
        vocabulary, which would otherwise stall the engine at the first request for logprobs)."""
        self.token_bytes(0)
        return self

    def token_bytes(self, token_id: int) -> bytes:
        if self._bytes is None:
            self._bytes = vocabulary_bytes(self._tokenizer, self._vocab_size)
            self._special = special_names(self._tokenizer)
        return self._bytes[token_id] if 0 <= token_id < len(self._bytes) else b""

    def top(self, token_id: int, logprob: float) -> TopLogprob:
        raw = self.token_bytes(token_id)
        # A special token is named (``<|im_end|>``), as vLLM names it, with no bytes: it has none
        # in the answer's text (OpenAI: bytes may be absent where a token has no bytes).
        token = self._special.get(token_id) if not raw else None
        return TopLogprob(
            token=token or raw.decode("utf-8", errors="replace"), logprob=_number(logprob), bytes=list(raw)
        )

    def entry(
        self, token_id: int, logprob: float | None, alternatives: Sequence[tuple[int, float]]
    ) -> TokenLogprob:
        """The entry of ``token_id`` (chosen with ``logprob``) and the ``alternatives``, the most
        likely tokens at its place as (id, logprob), most likely first. A prompt's first token
        has no logprob: None, and no alternatives."""
        chosen = self.top(token_id, 0.0 if logprob is None else logprob)
        return TokenLogprob(
            token=chosen.token,
            logprob=None if logprob is None else chosen.logprob,
            bytes=chosen.bytes,
            top_logprobs=[self.top(i, lp) for i, lp in alternatives],
        )
