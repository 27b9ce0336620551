"""Log probabilities in the batching engine, for the jobs that ask: of each answer token and of
each prompt token, with the ``k`` most likely tokens at its place.

They are those of the model's raw distribution (``log_softmax`` of its logits, before
temperature, penalties, bias or a grammar change them), as vLLM reports them by default. The
numbers of a whole step are computed together and copied from the device once.
"""

from __future__ import annotations

import torch

from shared.logprobs import TokenLogprob
from worker.token_logprobs import TokenTexts

POSITIONS_AT_ONCE = 64  # prompt positions turned into log probabilities together (× vocabulary)


def answer_entries(
    texts: TokenTexts, logits: torch.Tensor, tokens: list[int], ks: list[int]
) -> list[TokenLogprob]:
    """One step's entries: row ``i`` of ``logits`` (raw, ``[rows, vocab]``) chose ``tokens[i]``,
    and its job asked for ``ks[i]`` alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    ids = torch.tensor(tokens, dtype=torch.long, device=logprobs.device)
    chosen = logprobs.gather(1, ids[:, None])[:, 0].tolist()
    k = min(max(ks, default=0), logprobs.shape[-1])
    top_values: list[list[float]] = [[] for _ in tokens]
    top_ids: list[list[int]] = [[] for _ in tokens]
    if k:
        top = torch.topk(logprobs, k, dim=-1)
        top_values, top_ids = top.values.tolist(), top.indices.tolist()
    return [
        texts.entry(token, chosen[i], list(zip(top_ids[i][: ks[i]], top_values[i][: ks[i]], strict=True)))
        for i, token in enumerate(tokens)
    ]


def prompt_entries(texts: TokenTexts, logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprob]:
    """Entries of prompt tokens: ``logits[i]`` (``[positions, vocab]``) is the model's prediction
    at the position before ``targets[i]``."""
    entries: list[TokenLogprob] = []
    for start in range(0, len(targets), POSITIONS_AT_ONCE):
        part = targets[start : start + POSITIONS_AT_ONCE]
        block = logits[start : start + len(part)]
        entries += answer_entries(texts, block, part, [k] * len(part))
    return entries
