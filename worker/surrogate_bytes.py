"""Byte-level tokens that would spell a UTF-16 surrogate in a JSON answer, and how both engines keep them out.

A surrogate (U+D800 to U+DFFF) "encoded" as UTF-8 is the lead byte ED followed by A0 to BF and
one more byte: not UTF-8 at all. xgrammar 0.2.8's rule for a JSON string takes such three bytes
as one character, so a model with byte-level tokens could write them: the answer's text then
decodes them to three U+FFFD characters, which is not the string the grammar checked (a
``maxLength`` of 2 let six characters through). Every other malformed sequence (overlong forms,
stray continuation bytes, code points past U+10FFFF) the grammar already refuses.

So a JSON answer (or text with strict calls) never takes a token with ED and A0-BF inside it
(``has_surrogate``: both engines' fixed mask), and after a token that ends with the lead byte ED
no token that begins with A0-BF (``after_lead``): ED 80-9F, the characters just below U+D800,
stay allowed, so any grammar that allows some character there has a way on (one whose string
allows surrogates only, a ``pattern`` of the range U+D800 to U+DFFF, has none: its job fails naming
``response_format``, as for any schema no UTF-8 answer follows). ED is never a continuation
byte, so a token that ends with it always leaves a character open.
"""

from __future__ import annotations

from collections.abc import Sequence

LEAD = 0xED  # the lead byte of U+D000 to U+DFFF
HIGH = range(0xA0, 0xC0)  # its continuation bytes that make a surrogate


def has_surrogate(raw: bytes) -> bool:
    """Whether a token's bytes spell (the start of) a surrogate inside themselves."""
    return any(raw[i] == LEAD and raw[i + 1] in HIGH for i in range(len(raw) - 1))


class SurrogateGuard:
    """A vocabulary's tokens that end with the lead byte, and those a next token must then not be."""

    def __init__(self, vocabulary: Sequence[bytes]) -> None:
        self.lead_ends = frozenset(i for i, raw in enumerate(vocabulary) if raw.endswith(bytes([LEAD])))
        self.after_lead = frozenset(i for i, raw in enumerate(vocabulary) if raw and raw[0] in HIGH)

    def leaves_lead(self, last_token: int | None) -> bool:
        """Whether the answer's last token (None: none yet, or not known) left the lead byte open."""
        return last_token is not None and last_token in self.lead_ends
