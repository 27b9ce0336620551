"""A job continued from its earlier run's tokens (after its worker was lost) that an engine cannot
continue: it ends failed with a reason, and the engine goes on with the others."""

from __future__ import annotations

from typing import Any

import pytest

from tests.engine_driving import SCHEMA, Collected, alone, drive, job, request
from tests.engine_outputs import ids_of
from worker.batch_lm import BatchedCausalLM
from worker.engine import CannotContinue, Engine, EngineJob
from worker.vllm_engine import check_continuable


def test_a_continuation_whose_earlier_tokens_fill_this_runs_budget_ends_at_its_length(
    batched: BatchedCausalLM,
) -> None:
    whole = job(request("a long answer", max_tokens=30))
    ids = ids_of(drive(batched, [whole], {}), whole)
    assert len(ids) == 30
    continued = job(request("a long answer", max_tokens=10))  # this worker's budget: smaller
    continued.resume_ids = ids[:20]
    seen = Collected()
    engine = Engine(batched, seen)
    engine.start()
    try:
        engine.submit(continued)
        seen.wait(lambda: seen.end(continued) is not None)
    finally:
        engine.stop()
    end: Any = seen.end(continued)  # its answer is as long as this worker lets it be: no new text
    assert (end.finish_reason, end.error_type, end.completion_tokens) == ("length", "", 10)
    assert seen.text(continued) == ""  # (a RuntimeError before, then a false 400)


@pytest.mark.parametrize("fields", [{"json_schema": SCHEMA}, {"json_object": True}])
def test_the_vllm_engine_does_not_continue_a_json_answer(fields: dict[str, Any]) -> None:
    # vLLM takes the earlier tokens as prompt and starts its grammar over: a second JSON value
    # would begin mid-answer. (The transformers engine replays them through the grammar:
    # test_batch_structured_output.)
    with pytest.raises(CannotContinue, match="cannot continue a JSON answer"):
        check_continuable(request("x", **fields), '{"name": "Al')
    check_continuable(request("x"), '{"name": "Al')  # any other answer goes on


def test_a_job_that_cannot_be_continued_ends_failed_with_its_reason_and_the_engine_goes_on(
    tiny_backend: Any,
) -> None:
    model = BatchedCausalLM(tiny_backend, slots=2, max_len=512)
    add = model.add

    def add_as_vllm_does(job: EngineJob) -> None:  # named as BatchedCausalLM.add's
        if job.resume_ids:
            check_continuable(job.request, tiny_backend.tokenizer.decode(job.resume_ids))
        add(job)

    model.add = add_as_vllm_does  # type: ignore[method-assign]
    seen = Collected()
    engine = Engine(model, seen)
    engine.start()
    try:
        continued = job(request("a person", json_schema=SCHEMA, max_tokens=40))
        continued.resume_ids = tiny_backend.tokenizer.encode('{"name": "Al', add_special_tokens=False)
        after = job(request("after it", max_tokens=10))
        engine.submit(continued)
        engine.submit(after)
        seen.wait(lambda: seen.end(continued) is not None and seen.end(after) is not None)
        end: Any = seen.end(continued)
        assert (end.finish_reason, end.error_type) == ("error", "generation_error")
        assert "cannot continue a JSON answer" in end.error_message and seen.text(continued) == ""
        assert seen.text(after) == alone(tiny_backend, after.request)[0]
    finally:
        engine.stop()


def test_a_stream_chat_model_cannot_continue_and_says_so_as_a_failure_not_a_bad_request(
    tiny_backend: Any,
) -> None:
    """A model served through its own stream_chat (ChatGLM) cannot take an earlier run's tokens:
    the job fails (502 on routes that wait, which the client may send again), not a 400 that
    blames a request that was fine."""
    from worker.serial_model import SerialModel

    seen = Collected()
    engine = Engine(SerialModel(tiny_backend, slots=1), seen)
    engine.start()
    try:
        continued = job(request("go on", max_tokens=10))
        continued.resume_ids = [5, 6, 7]
        engine.submit(continued)
        seen.wait(lambda: seen.end(continued) is not None)
    finally:
        engine.stop()
    end: Any = seen.end(continued)
    assert (end.finish_reason, end.error_type) == ("error", "generation_error")
    assert "cannot continue an answer another worker began" in end.error_message
