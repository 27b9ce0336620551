"""Numbers written in ASCII digits: ``str.isdigit()`` also takes '²' (which ``int()`` refuses)
and other scripts' digits such as '١٢' (which ``int()`` reads as 12)."""

from __future__ import annotations


def ascii_digits(text: str) -> bool:
    """Whether ``text`` is one or more of the digits 0-9, and nothing else."""
    return text.isascii() and text.isdigit()
