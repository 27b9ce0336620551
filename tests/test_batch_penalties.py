"""Logit bias and penalties on the transformers engine, tiny model (fp32), honoured per job inside
a batch of other jobs: penalties against greedy tokens computed by hand from full forward passes
(repetition by HF's own logits processor), a continued job's earlier tokens counted."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from shared.schemas import GenerationRequest
from tests.engine_driving import alone, drive, job, request
from tests.engine_outputs import ids_of
from worker.batch_lm import BatchedCausalLM


def test_a_positive_bias_forces_a_token_and_a_negative_one_bans_it(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    forced = tiny_backend.tokenizer.convert_tokens_to_ids("A")
    plain = job(request("bias me", max_tokens=30))
    seen = drive(batched, [plain], {})
    usual = ids_of(seen, plain)
    banned = sorted({usual[0], max(set(usual), key=usual.count)})
    up = [
        job(request("bias me", max_tokens=12, logit_bias={forced: 100.0}, **s))
        for s in ({}, {"temperature": 1.0})
    ]
    down = job(request("bias me", max_tokens=30, logit_bias=dict.fromkeys(banned, -100.0)))
    seen = drive(batched, [*up, down], {})
    for j in up:
        assert ids_of(seen, j) == [forced] * 12
    assert ids_of(seen, down) and not set(ids_of(seen, down)) & set(banned)


def reference_penalized(backend: Any, prompt: list[int], n: int, request: GenerationRequest) -> list[int]:
    """Greedy tokens with the penalties applied by hand to full forward passes (repetition by
    HF's own processor): what the engine must give."""
    from transformers import RepetitionPenaltyLogitsProcessor

    repetition = RepetitionPenaltyLogitsProcessor(request.repetition_penalty)
    ids = list(prompt)
    answer: list[int] = []
    for _ in range(n):
        with torch.inference_mode():
            logits = backend.model(input_ids=torch.tensor([ids])).logits[:, -1].float()
        logits = repetition(torch.tensor([ids]), logits)[0]
        counts = torch.bincount(torch.tensor(answer, dtype=torch.long), minlength=logits.shape[-1]).float()
        logits = logits - request.frequency_penalty * counts - request.presence_penalty * (counts > 0).float()
        token = int(logits.argmax())
        if token in backend.eos_ids:
            break
        answer.append(token)
        ids.append(token)
    return answer


@pytest.mark.parametrize(
    "penalties",
    [
        {"presence_penalty": 2.0},
        {"frequency_penalty": 2.0},
        {"repetition_penalty": 2.0},
        {"presence_penalty": -1.0, "frequency_penalty": 1.5, "repetition_penalty": 1.5},
    ],
)
def test_penalties_match_a_reference_computed_by_hand(
    tiny_backend: Any, batched: BatchedCausalLM, penalties: dict[str, float]
) -> None:
    prompts = [f"say it again {i}" for i in range(3)]
    reqs = [request(p, max_tokens=40, **penalties) for p in prompts]
    jobs = [job(r) for r in reqs] + [job(request("plain", max_tokens=40))]
    seen = drive(batched, jobs, {})
    for j, r in zip(jobs, reqs, strict=False):
        assert ids_of(seen, j) == reference_penalized(tiny_backend, tiny_backend.encode(r), 40, r)
    unpenalized = [alone(tiny_backend, request(p, max_tokens=40))[0] for p in prompts]
    assert [seen.text(j) for j in jobs[:3]] != unpenalized  # the penalties did change answers


def test_a_continued_job_counts_its_earlier_tokens_for_its_penalties(batched: BatchedCausalLM) -> None:
    fields = {"max_tokens": 40, "frequency_penalty": 0.8, "presence_penalty": 0.4, "repetition_penalty": 1.2}
    whole = job(request("again and again", **fields))
    ids = ids_of(drive(batched, [whole], {}), whole)
    continued = job(request("again and again", **fields))
    continued.resume_ids = ids[:25]
    assert ids_of(drive(batched, [continued], {}), continued) == ids[25:]
