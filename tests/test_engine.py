"""The batching engine on the tiny model (fp32): jobs run together give what each gives alone."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from shared.schemas import GenerationRequest
from tests.engine_driving import Collected, alone, drive, job, request, running_engine
from worker.batch_lm import BatchedCausalLM
from worker.engine import PROBE, Engine


@pytest.fixture
def batched(tiny_backend: Any) -> BatchedCausalLM:
    return BatchedCausalLM(tiny_backend, slots=4, max_len=512, prefill_chunk=16)


def test_greedy_jobs_run_together_answer_as_they_do_alone(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    # Prompts of different lengths (some longer than the prefill chunk, so prefilled in
    # chunks), more jobs than slots, and jobs that join while others are mid-answer.
    prompts = [f"question {i}: " + "tell me more " * (i % 4) for i in range(7)]
    reqs = [request(p, max_tokens=30 + 5 * i) for i, p in enumerate(prompts)]
    jobs = [job(r) for r in reqs]
    seen = drive(batched, jobs[:5], {3: jobs[5:6], 9: jobs[6:]})
    for j, r in zip(jobs, reqs, strict=True):
        end = seen.end(j)
        assert end is not None
        assert (seen.text(j), end.finish_reason) == alone(tiny_backend, r)
        assert end.completion_tokens == len(list(tiny_backend.generate(r))) or end.finish_reason == "stop"
    assert batched.cache.capacity <= batched.cache.max_len


def test_jobs_with_their_own_temperature_and_seed_sample_as_they_do_alone(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    reqs = [
        request("a story", temperature=0.7, seed=1, max_tokens=40),
        request("a story", temperature=1.3, seed=2, top_p=0.9, max_tokens=40),
        request("a poem", temperature=1.0, seed=3, top_k=5, max_tokens=40),
        request("a poem", max_tokens=40),
    ]
    jobs = [job(r) for r in reqs]
    seen = drive(batched, jobs, {})
    answers = [seen.text(j) for j in jobs]
    assert answers == [alone(tiny_backend, r)[0] for r in reqs]
    assert answers[0] != answers[1]  # same prompt, different settings: different answers


def test_a_stop_sequence_ends_its_own_job_only(tiny_backend: Any, batched: BatchedCausalLM) -> None:
    free = request("stop test", max_tokens=40)
    full, _ = alone(tiny_backend, free)
    stop = full[10:14]
    assert stop.strip() and full.index(stop) >= 10
    stopped, other = job(request("stop test", max_tokens=40, stop=[stop])), job(free)
    seen = drive(batched, [stopped, other], {})
    assert seen.text(stopped) == full[: full.index(stop)]
    assert seen.end(stopped).finish_reason == "stop"  # type: ignore[union-attr]
    assert seen.text(other) == full and seen.end(other).finish_reason == "length"  # type: ignore[union-attr]


def test_a_job_that_joins_gets_its_first_token_while_a_long_one_runs(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    long_job = job(request("a long answer", max_tokens=300))
    short = job(request("a short one", max_tokens=5))
    seen = drive(batched, [long_job], {100: [short]})
    long_tokens_before = sum(
        1
        for step, o in seen.outputs
        if o.job is long_job and step <= min(s for s, o2 in seen.outputs if o2.job is short)
    )
    first_short = min(step for step, o in seen.outputs if o.job is short)
    long_end = max(step for step, o in seen.outputs if o.job is long_job)
    assert first_short < long_end
    assert long_tokens_before < 110  # it joined at step 100 and got a token within a step or two
    assert seen.end(short) is not None and seen.end(long_job).finish_reason == "length"  # type: ignore[union-attr]


def test_more_jobs_than_slots_wait_for_a_free_row(tiny_backend: Any) -> None:
    model = BatchedCausalLM(tiny_backend, slots=2, max_len=512)
    jobs = [job(request(f"job {i}", max_tokens=20)) for i in range(6)]
    for j in jobs:
        model.add(j)
    most = 0
    while model.ready_in() == 0:
        model.step()
        most = max(most, model.running)
    assert most == 2


def test_a_job_longer_than_the_cache_allows_is_refused_clearly(tiny_backend: Any) -> None:
    from shared.limits import InvalidJobRequest

    model = BatchedCausalLM(tiny_backend, slots=2, max_len=32)
    with pytest.raises(InvalidJobRequest, match="maximum context length is 32 tokens"):
        model.add(job(request("this prompt is long " * 10)))
    fits = job(request("hi", max_tokens=500))
    seen = drive(model, [fits], {})
    assert seen.end(fits).finish_reason == "length"  # type: ignore[union-attr]
    assert fits.prompt_tokens + fits.completion_tokens == 32


def test_cancel_stops_a_job_within_one_step_and_frees_its_slot(
    tiny_backend: Any, long_prompts: list[str]
) -> None:
    with running_engine(BatchedCausalLM(tiny_backend, slots=2, max_len=2048)) as (engine, seen):
        victim, other = job(request(long_prompts[0], max_tokens=1500)), job(request("go on", max_tokens=200))
        engine.submit(victim)
        engine.submit(other)
        seen.wait(lambda: victim.completion_tokens >= 20)
        victim.cancel.set()
        canceled_at = seen.steps
        seen.wait(lambda: seen.end(victim) is not None)
        end_step = next(s for s, o in seen.outputs if o.job is victim and o.finish_reason)
        assert seen.end(victim).finish_reason == "canceled"  # type: ignore[union-attr]
        assert end_step <= canceled_at + 2  # the step in flight, then the cancel
        late = job(request("take the slot", max_tokens=10))
        engine.submit(late)
        seen.wait(lambda: seen.end(late) is not None and seen.end(other) is not None)
        assert seen.text(other) == alone(tiny_backend, other.request)[0]
        assert seen.text(late) == alone(tiny_backend, late.request)[0]
        ended = seen.end(late)
        assert ended is not None and ended.finish_reason in ("stop", "length")


def test_a_job_past_its_deadline_ends_with_finish_reason_timeout(
    tiny_backend: Any, long_prompts: list[str]
) -> None:
    with running_engine(BatchedCausalLM(tiny_backend, slots=2, max_len=2048)) as (engine, seen):
        slow = job(request(long_prompts[0], max_tokens=1500))
        slow.deadline = time.monotonic() + 0.3
        engine.submit(slow)
        seen.wait(lambda: seen.end(slow) is not None)
        assert seen.end(slow).finish_reason == "timeout"  # type: ignore[union-attr]
        assert 0 < slow.completion_tokens < 1500


def test_models_without_batching_run_one_job_per_slot_through_the_same_engine(tiny_backend: Any) -> None:
    # ChatGLM's own stream_chat cannot batch: its jobs run as iterators, a step each per engine
    # step (driven here through the tiny model's own single-job loop, which has the same shape).
    from worker.serial_model import SerialModel

    model = SerialModel(tiny_backend, slots=3)
    reqs = [request(f"serial {i}", max_tokens=20 + i) for i in range(3)]
    jobs = [job(r) for r in reqs]
    seen = drive(model, jobs, {})
    for j, r in zip(jobs, reqs, strict=True):
        assert (seen.text(j), seen.end(j).finish_reason) == alone(tiny_backend, r)  # type: ignore[union-attr]
    first_steps = [min(s for s, o in seen.outputs if o.job is j) for j in jobs]
    assert first_steps == [1, 1, 1]  # interleaved, not one after another


@pytest.mark.parametrize("arch", ["llama", "mistral-window"])
def test_other_architectures_batch_as_they_run_alone(tiny_backend: Any, arch: str) -> None:
    # The tiny model is Qwen2-shaped; models built on other transformers classes take the
    # attention mask differently (and Mistral here has a sliding window shorter than the answers).
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    from worker.causal_lm import CausalLMChat

    tokenizer = tiny_backend.tokenizer
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.4,
        eos_token_id=tiny_backend.model.config.eos_token_id,
    )
    torch.manual_seed(0)
    model: LlamaForCausalLM | MistralForCausalLM
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=24))
    backend = CausalLMChat(model.eval(), tokenizer, arch, "cpu", "float32")
    batched = BatchedCausalLM(backend, slots=3, max_len=256, prefill_chunk=16)
    reqs = [request(f"{arch} question {i} " + "more " * i, max_tokens=40) for i in range(4)]
    jobs = [job(r) for r in reqs]
    seen = drive(batched, jobs[:3], {5: jobs[3:]})
    assert [seen.text(j) for j in jobs] == [alone(backend, r)[0] for r in reqs]


def test_a_failing_step_fails_the_jobs_it_held_and_the_engine_goes_on(tiny_backend: Any) -> None:
    model = BatchedCausalLM(tiny_backend, slots=2, max_len=512)
    seen = Collected()
    engine = Engine(model, seen)
    real_forward = model._forward
    calls = {"n": 0}

    def failing_once(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_forward(*args, **kwargs)

    model._forward = failing_once  # type: ignore[method-assign]
    engine.start()
    try:
        first = [job(request(f"doomed {i}", max_tokens=30)) for i in range(2)]
        for j in first:
            engine.submit(j)
        seen.wait(lambda: all(seen.end(j) is not None for j in first))
        assert {seen.end(j).error_type for j in first} == {"generation_error"}  # type: ignore[union-attr]
        after = job(request("after the failure", max_tokens=10))
        engine.submit(after)
        seen.wait(lambda: seen.end(after) is not None)
        assert engine.alive() and seen.text(after) == alone(tiny_backend, after.request)[0]
    finally:
        engine.stop()


def test_a_step_that_fails_for_its_request_leaves_the_engine_running(tiny_backend: Any) -> None:
    """A request that breaks every step it joins, sent again and again (the SDKs retry a 502),
    fails each time, and the engine goes on: its own two-token job runs after each failure."""
    model = BatchedCausalLM(tiny_backend, slots=2, max_len=512)
    seen = Collected()
    engine = Engine(model, seen)
    real_forward = model._forward

    def poisoned(*args: Any, **kwargs: Any) -> Any:
        if any(j.job_id.startswith("poison") for j in model._held):
            raise RuntimeError("a kernel refused this input (simulated)")
        return real_forward(*args, **kwargs)

    model._forward = poisoned  # type: ignore[method-assign]
    engine.start()
    try:
        for i in range(4):
            bad = job(request(f"bad {i}", max_tokens=5), name=f"poison-{i}")
            assert engine.submit(bad)
            seen.wait(lambda: seen.end(bad) is not None)  # noqa: B023  # waited for here
            assert seen.end(bad).error_type == "generation_error"  # type: ignore[union-attr]
        good = job(request("fine", max_tokens=5))
        assert engine.submit(good)
        seen.wait(lambda: seen.end(good) is not None)
        assert engine.alive() and seen.text(good) == alone(tiny_backend, good.request)[0]
        assert PROBE not in {out.job.job_id for _, out in seen.outputs}  # its own job is not published
    finally:
        engine.stop()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # its thread ends so
def test_a_step_failure_the_engine_cannot_run_past_stops_it(tiny_backend: Any) -> None:
    """A lost GPU (or vLLM's executor dead) fails every step: the worker took job after job and
    failed each. Now a failed step is followed by the engine's own two-token job; when that fails
    too, the engine stops, so its worker exits for its supervisor, and a job it had not started
    goes back to its queue."""
    model = BatchedCausalLM(tiny_backend, slots=2, max_len=512)
    seen = Collected()
    engine = Engine(model, seen)

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")

    model._forward = broken  # type: ignore[method-assign]
    engine.start()
    try:
        doomed = job(request("doomed", max_tokens=5))
        assert engine.submit(doomed)
        seen.wait(lambda: seen.end(doomed) is not None)
        assert seen.end(doomed).error_type == "generation_error"  # type: ignore[union-attr]
        seen.wait(lambda: not engine.alive())
        later = job(request("after", max_tokens=5))
        assert not engine.submit(later)  # its thread hands it back to the queue
    finally:
        engine.stop()


class FailingChat:
    """The tiny model's own single-job loop (the shape of ChatGLM's stream_chat) that fails,
    when told, at a job's second step: for one prompt only (``poison``), or for all (``broken``:
    a lost GPU)."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.broken = False

    def generate(self, req: GenerationRequest) -> Iterator[Any]:
        for n, step in enumerate(self.backend.generate(req)):
            if n == 1 and (self.broken or "poison" in str(req.messages[-1].content)):
                raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
            yield step


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # its thread ends so
def test_a_serial_model_stops_its_engine_when_every_job_fails_but_not_for_one_bad_job(
    tiny_backend: Any,
) -> None:
    from worker.serial_model import SerialModel

    chat = FailingChat(tiny_backend)
    with running_engine(SerialModel(chat, slots=2)) as (engine, seen):  # type: ignore[arg-type]
        good, bad = job(request("fine", max_tokens=30)), job(request("poison", max_tokens=30))
        for j in (good, bad):
            assert engine.submit(j)
        seen.wait(lambda: seen.end(good) is not None and seen.end(bad) is not None)
        assert seen.end(bad).error_type == "generation_error"  # type: ignore[union-attr]
        assert seen.text(good) == alone(tiny_backend, good.request)[0]  # a job beside it runs on
        alone_bad = job(request("poison again", max_tokens=30))  # alone, its step is the whole step
        assert engine.submit(alone_bad)
        seen.wait(lambda: seen.end(alone_bad) is not None)
        assert seen.end(alone_bad).error_type == "generation_error"  # type: ignore[union-attr]
        after = job(request("after", max_tokens=10))
        assert engine.submit(after)
        seen.wait(lambda: seen.end(after) is not None)
        assert engine.alive() and seen.text(after) == alone(tiny_backend, after.request)[0]

        chat.broken = True  # now every job fails, and the engine's own job after them
        doomed = job(request("doomed", max_tokens=30))
        assert engine.submit(doomed)
        seen.wait(lambda: seen.end(doomed) is not None)
        assert seen.end(doomed).error_type == "generation_error"  # type: ignore[union-attr]
        seen.wait(lambda: not engine.alive())
        assert not engine.submit(job(request("later", max_tokens=5)))  # its thread hands it back
