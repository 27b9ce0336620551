"""Choosing the next token from a step's logits with one job's own sampling settings."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int

    @property
    def greedy(self) -> bool:
        # Below MIN_TEMPERATURE the scaled logits overflow; such a temperature means greedy anyway.
        return self.temperature < MIN_TEMPERATURE or self.top_k == 1


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p (nucleus) filtering of a 1-D logits vector (float32)."""
    scores = logits.float() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop = (torch.cumsum(probs, dim=-1) - probs) > params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    return scores


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """The next token id: argmax when greedy, else a draw from the filtered distribution."""
    if params.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, params), dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=generator))
