"""A text that holds every line separator a reader may split on (U+2028, U+2029, U+0085, CR+LF
pairs and lone CRs), as the synthetic worker writes it: what a client must get whole."""

from __future__ import annotations

from worker.synthetic import SyntheticBackend

MODEL = "separators"
TEXT = "a\u2028b\u2029c\x85d\r\ne\rf\ng \u2028\u2028 ✓\r"
TOKENS = 12
EXPECTED = "".join(SyntheticBackend(MODEL, 1, TEXT).token_text(n) for n in range(1, TOKENS + 1))
