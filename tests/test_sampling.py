"""Per-job sampling: temperature, top-k, top-p and seeds."""

from __future__ import annotations

import torch

from worker.sampling import SamplingParams, filter_logits, sample_next


def test_top_k_keeps_only_the_k_best() -> None:
    logits = torch.tensor([1.0, 5.0, 3.0, 4.0, 2.0])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(1.0, 1.0, 2)))
    assert kept.tolist() == [False, True, False, True, False]


def test_top_p_keeps_the_smallest_set_holding_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    kept = torch.isfinite(filter_logits(probs.log(), SamplingParams(1.0, 0.75, 0)))
    assert kept.tolist() == [True, True, False, False]


def test_greedy_takes_the_argmax_and_seeds_repeat() -> None:
    logits = torch.randn(100, generator=torch.Generator().manual_seed(1))
    assert sample_next(logits, SamplingParams(0.0, 1.0, 0), torch.Generator()) == int(logits.argmax())
    params = SamplingParams(1.0, 0.9, 50)
    draw = [sample_next(logits, params, torch.Generator().manual_seed(3)) for _ in range(2)]
    assert draw[0] == draw[1]
    many = {sample_next(logits, params, torch.Generator().manual_seed(s)) for s in range(30)}
    assert len(many) > 1
