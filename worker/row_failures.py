"""One job's failure inside a batched step: the job ends with its error, the step's others go on.

A step's forward pass is shared, but choosing each job's token is the job's own: its logit bias,
penalties and grammar mask, its draw. When that leaves a job no token to take (its schema cannot
be completed, say a ``$ref`` cycle with no way out or a pattern nothing matches) or its draw
fails, only that job ends, failed; the engine's other jobs never see it.
"""

from __future__ import annotations

import torch


class RowFailed(Exception):
    """Why one job of a step ends failed: OpenAI's error type, and the field it is about."""

    def __init__(self, error_type: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.param = param

    @classmethod
    def of(cls, exc: BaseException) -> RowFailed:
        return cls("generation_error", f"{type(exc).__name__}: {exc}")


def dead_row(row: torch.Tensor, grammar: str | None, answered: int) -> RowFailed:
    """Why a job's float32 logits row, after its rules, leaves it no token: a NaN score, or
    (every score -inf) a grammar with no way on, ``answered`` tokens into its answer (``grammar``:
    the request field it comes from)."""
    if bool(torch.isnan(row).any()):
        return RowFailed("generation_error", "the job's token scores are not numbers (NaN) after its rules")
    if grammar:
        return no_way_on(answered, grammar)
    return RowFailed("generation_error", "the job's logit bias and penalties left it no token to take")


def no_way_on(answered: int, field: str = "response_format") -> RowFailed:
    """A job's grammar that allows no token ``answered`` tokens into its answer: its schema (of
    ``field``: the answer's, or a strict function's in ``tools``)."""
    return RowFailed(
        "invalid_request_error",
        f"{field}: the schema allows no token after the answer's first {answered} tokens: "
        "no JSON value can complete it (a $ref cycle with no way out, or a pattern that matches "
        "nothing?)",
        param=field,
    )


def grammar_not_built(field: str = "response_format") -> RowFailed:
    """A job that vLLM ended before its first token with its grammar: its compiler could not
    build the grammar of ``field``'s schema (one xgrammar 0.2 compiles alone, without vLLM's
    cache, but not with it: a pattern that repeats one character or class more than 128 times)."""
    return RowFailed(
        "invalid_request_error",
        f"{field}: the vLLM engine's grammar compiler could not build this schema's grammar "
        "(with vLLM's xgrammar, a pattern that repeats one character or class more than 128 "
        "times, such as ^[a-z]{1,200}$, is a known case: split it, as ^[a-z]{1,128}[a-z]{0,72}$)",
        param=field,
    )


def is_dead(block: torch.Tensor) -> list[bool]:
    """For each row of a float32 ``[rows, vocab]`` block: whether it leaves no token to take."""
    return (torch.isneginf(block).all(dim=-1) | torch.isnan(block).any(dim=-1)).tolist()
