"""A sampled job continued after a crash draws what its uninterrupted run would have drawn: each
answer token's draw depends on the job's seed and the token's index only (``sampling.JobDraws``);
a job without a seed takes one from its job id. On the tiny model (fp32), at engine level."""

from __future__ import annotations

from typing import Any

import pytest

from shared.schemas import GenerationRequest
from tests.engine_driving import drive, job, request
from worker.batch_lm import BatchedCausalLM
from worker.engine import EngineJob
from worker.sampling import job_seed, token_seed

SAMPLED = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 40}


@pytest.fixture
def batched(tiny_backend: Any) -> BatchedCausalLM:
    return BatchedCausalLM(tiny_backend, slots=4, max_len=512, prefill_chunk=16)


def answer_of(model: BatchedCausalLM, j: EngineJob) -> tuple[list[int], str | None]:
    """The job's answer token ids as one run (or one continuation) gives them, and its end."""
    seen = drive(model, [j], {})
    ids = [t for _, o in seen.outputs if o.job is j for t in o.token_ids]
    end = seen.end(j)
    return ids, end.finish_reason if end is not None else None


def continued(req: GenerationRequest, name: str, earlier: list[int]) -> EngineJob:
    """The job as another worker takes it up after its first run stored ``earlier``."""
    j = job(req, name)
    j.resume_ids = list(earlier)
    return j


def test_token_seeds_are_splitmix64_outputs_cut_to_63_bits() -> None:
    # SplitMix64 seeded with 0: its first outputs (the reference implementation's values).
    assert token_seed(0, 0) == 0xE220A8397B1DCDAF >> 1
    assert token_seed(0, 1) == 0x6E789E6AA1B965F4 >> 1
    seeds = {token_seed(s, i) for s in (1, 2, 2**63 - 1) for i in range(100)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    assert job_seed(5, "anything") == 5  # the request's own seed, as it is
    assert job_seed(None, "a") == job_seed(None, "a") != job_seed(None, "b")
    assert 0 <= job_seed(None, "a") < 2**63


def test_a_seeded_sampled_job_continued_from_k_tokens_draws_what_its_whole_run_drew(
    batched: BatchedCausalLM,
) -> None:
    req = request("tell me a story about the sea", seed=1234, **SAMPLED)
    whole, end = answer_of(batched, job(req, "whole"))
    assert len(whole) >= 30 and end is not None
    ks = [0, 1, len(whole) // 3, len(whole) // 2, len(whole) - 1]
    # All the continuations at once, in one batch, each with its own job id (a seeded job's
    # draws do not depend on it): rows and batch-mates do not change a draw either.
    jobs = [continued(req, f"continued-{k}", whole[:k]) for k in ks]
    seen = drive(batched, jobs, {})
    for k, j in zip(ks, jobs, strict=True):
        ids = [t for _, o in seen.outputs if o.job is j for t in o.token_ids]
        assert whole[:k] + ids == whole, f"continued after {k} tokens"
        assert seen.end(j).finish_reason == end  # type: ignore[union-attr]


def test_an_unseeded_job_draws_from_its_job_id_across_a_continuation(batched: BatchedCausalLM) -> None:
    req = request("tell me a story about the sea", **SAMPLED)
    whole, end = answer_of(batched, job(req, "job-5f0c"))
    assert len(whole) >= 30
    assert answer_of(batched, job(req, "job-5f0c")) == (whole, end)  # a rerun of the same job
    for k in (1, len(whole) // 2):
        rest, rest_end = answer_of(batched, continued(req, "job-5f0c", whole[:k]))
        assert (whole[:k] + rest, rest_end) == (whole, end), f"continued after {k} tokens"
    others = [answer_of(batched, job(req, f"job-{n}"))[0] for n in ("9a1e", "77d3")]
    assert all(other != whole for other in others) and others[0] != others[1]


def test_an_unseeded_job_in_a_batch_samples_as_it_does_alone_with_its_job_id(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    reqs = [request(f"a poem {i}", **SAMPLED) for i in range(3)]
    jobs = [job(r, f"job-{i}") for i, r in enumerate(reqs)]
    seen = drive(batched, jobs, {})
    for j, r in zip(jobs, reqs, strict=True):
        alone = "".join(s.delta for s in tiny_backend.generate(r, job_id=j.job_id))
        assert seen.text(j) == alone
