"""Log probabilities of the answer and of the prompt from the transformers engine on the tiny
model (fp32), per job inside a batch of other jobs: each entry and its alternatives checked
against one full forward pass without a cache."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tests.engine_driving import SCHEMA, alone, drive, job, request
from tests.engine_outputs import ids_of, outputs_of
from worker.batch_lm import BatchedCausalLM


def full_logprobs(backend: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of one forward pass over ``ids`` without a cache: ``[len(ids), vocab]``."""
    with torch.inference_mode():
        return torch.log_softmax(backend.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def check_entries(backend: Any, prompt: list[int], answer: list[int], entries: list[Any], k: int) -> None:
    """Each entry holds its token's log probability under the model's raw distribution and the k
    likeliest tokens there, as one full forward pass gives them."""
    reference = full_logprobs(backend, prompt + answer)
    assert len(entries) == len(answer)
    for i, (token, entry) in enumerate(zip(answer, entries, strict=True)):
        row = reference[len(prompt) - 1 + i]
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        top = torch.topk(row, k)
        assert len(entry.top_logprobs) == k
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_logprobs_are_the_raw_distributions_with_k_alternatives(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    reqs = [
        request("how likely", logprobs=3, max_tokens=25),
        request("how likely", logprobs=5, max_tokens=25, temperature=1.2, seed=4),
        request("json likely", logprobs=2, json_schema=SCHEMA, max_tokens=100),
        request("plain", max_tokens=25),
        request("no alternatives", logprobs=0, max_tokens=10, presence_penalty=1.0),
    ]
    jobs = [job(r) for r in reqs]
    seen = drive(batched, jobs, {})
    tokenizer = tiny_backend.tokenizer
    for j, r in zip(jobs, reqs, strict=True):
        outputs = outputs_of(seen, j)
        entries = [e for o in outputs for e in o.logprobs]
        # An entry per token the model took; an end of sequence's too (lm-eval's loglikelihood
        # reads the last one), named and with no bytes: the answer's text leaves it out.
        eos = [o for o in outputs if o.finish_reason == "stop" and not o.token_ids and o.logprobs]
        for o in outputs:
            taken = len(o.token_ids) + (1 if o in eos else 0)
            assert len(o.logprobs) == (taken if r.logprobs is not None else 0)
        if r.logprobs is None:
            assert entries == []
            continue
        assert len(entries) == j.completion_tokens
        answer = ids_of(seen, j)
        if eos:
            assert entries[-1].token == "<|im_end|>" and entries[-1].bytes == []
            answer = [*answer, tokenizer.convert_tokens_to_ids("<|im_end|>")]
        check_entries(tiny_backend, tiny_backend.encode(r), answer, entries, r.logprobs)
        joined = b"".join(bytes(e.bytes or []) for e in entries).decode("utf-8", errors="replace")
        assert joined == seen.text(j)
        for e in entries:
            values = [t.logprob for t in e.top_logprobs]
            assert values == sorted(values, reverse=True)
    assert seen.end(jobs[2]).finish_reason == "stop"  # type: ignore[union-attr]
    assert outputs_of(seen, jobs[2])[-1].logprobs[-1].token == "<|im_end|>"  # the JSON's end, with its entry


@pytest.mark.parametrize("chunk", [64, 16])  # one left-padded pass, or a chunk per step
def test_prompt_logprobs_come_once_and_match_a_full_forward_pass(tiny_backend: Any, chunk: int) -> None:
    model = BatchedCausalLM(tiny_backend, slots=4, max_len=512, prefill_chunk=chunk)
    keeps: list[int] = []
    real = model._forward

    def recording(
        ids: torch.Tensor, positions: torch.Tensor, mask: Callable[[int | None], torch.Tensor], keep: int = 1
    ) -> Any:
        keeps.append(keep)
        return real(ids, positions, mask, keep)

    model._forward = recording  # type: ignore[method-assign]
    reqs = [
        request("short", prompt_logprobs=2, max_tokens=8),
        request("a longer prompt that pads the others " * 2, max_tokens=8),
        request("middle sized prompt", prompt_logprobs=0, logprobs=1, max_tokens=8),
    ]
    jobs = [job(r) for r in reqs]
    seen = drive(model, jobs, {})
    for j, r in zip(jobs, reqs, strict=True):
        assert seen.text(j) == alone(tiny_backend, r)[0]  # keeping more logits changes no token
        carrying = [o for o in outputs_of(seen, j) if o.prompt_logprobs is not None]
        if r.prompt_logprobs is None:
            assert carrying == []
            continue
        assert len(carrying) == 1 and carrying[0] is outputs_of(seen, j)[0]  # with its first token
        entries = carrying[0].prompt_logprobs
        assert entries is not None
        prompt = tiny_backend.encode(r)
        assert len(entries) == len(prompt) == j.prompt_tokens and entries[0].logprob is None
        assert all(e is not None for e in entries[1:])
        check_entries(tiny_backend, prompt[:1], prompt[1:], list(entries[1:]), r.prompt_logprobs)
    assert max(keeps) <= chunk and keeps.count(1) >= 8  # decode steps keep only the last logits
    plain_keeps = len(keeps)
    drive(model, [job(request("plain", max_tokens=3)), job(request("other", max_tokens=3))], {})
    assert set(keeps[plain_keeps:]) == {1}


def test_prompt_logprobs_longer_than_a_chunk_cover_every_token(tiny_backend: Any) -> None:
    model = BatchedCausalLM(tiny_backend, slots=2, max_len=512, prefill_chunk=16)
    r = request("a prompt that takes several chunks to prefill " * 3, prompt_logprobs=3, max_tokens=5)
    j = job(r)
    seen = drive(model, [j], {})
    prompt = tiny_backend.encode(r)
    assert len(prompt) > 3 * 16
    entries = outputs_of(seen, j)[0].prompt_logprobs
    assert entries is not None and len(entries) == len(prompt) and entries[0].logprob is None
    check_entries(tiny_backend, prompt[:1], prompt[1:], list(entries[1:]), 3)


def test_a_continued_job_does_not_send_its_prompt_logprobs_again(batched: BatchedCausalLM) -> None:
    whole = job(request("once only", prompt_logprobs=1, max_tokens=20))
    seen = drive(batched, [whole], {})
    continued = job(request("once only", prompt_logprobs=1, max_tokens=20))
    continued.resume_ids = ids_of(seen, whole)[:5]
    seen = drive(batched, [continued], {})
    assert all(o.prompt_logprobs is None for o in outputs_of(seen, continued))
    assert ids_of(seen, continued)  # it went on
