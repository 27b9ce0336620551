"""JSON answers from the transformers engine on the tiny model (fp32), grammar-constrained: a JSON
schema's, or any JSON object, honoured per job inside a batch of other jobs, checked with
jsonschema; a grammar is compiled in its job's slot thread."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from shared.job_store.vocabulary import JobField
from tests.engine_driving import SCHEMA, alone, drive, job, request, running_engine
from tests.engine_outputs import ids_of
from worker.batch_lm import BatchedCausalLM
from worker.engine import CannotContinue
from worker.logits_rules import not_json_ids
from worker.step_publisher import final_record


# Seeded: an unseeded job draws from its id (its object's address here); a run is the same every time.
@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 1.0, "seed": 7}, {"temperature": 0.8, "top_p": 0.9, "seed": 11}]
)
def test_json_schema_answers_are_json_that_follows_the_schema(
    batched: BatchedCausalLM, sampling: dict[str, Any]
) -> None:
    jobs = [job(request(f"a person {i}", json_schema=SCHEMA, max_tokens=100, **sampling)) for i in range(5)]
    seen = drive(batched, jobs, {})
    for j in jobs:
        assert seen.end(j).finish_reason == "stop"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(seen.text(j)), SCHEMA)  # strict JSON: no raw control characters


def test_json_object_answers_are_json_objects(batched: BatchedCausalLM) -> None:
    jobs = [job(request(f"an object {i}", json_object=True, max_tokens=120)) for i in range(8)]
    seen = drive(batched, jobs, {})
    ended = [j for j in jobs if seen.end(j).finish_reason == "stop"]  # type: ignore[union-attr]
    assert len(ended) >= 2  # a random model writes long keys: some run out of tokens first
    for j in ended:
        assert isinstance(json.loads(seen.text(j)), dict)
    for j in jobs:
        assert seen.text(j).startswith("{")  # an object, never an array or a bare value


def test_control_characters_and_special_tokens_never_get_into_the_json(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    # xgrammar 0.2.8 lets raw control characters into a string with a maxLength, and would let
    # special tokens in, which decoding drops: the engine keeps both out, however favoured.
    tokenizer = tiny_backend.tokenizer
    control = tokenizer("\x10\x01\x1f\n", add_special_tokens=False)["input_ids"]
    special = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|endoftext|>")]
    favoured = dict.fromkeys(control + special, 100.0)
    jobs = [
        job(request(f"controls {i}", json_schema=SCHEMA, max_tokens=100, logit_bias=favoured))
        for i in range(3)
    ]
    seen = drive(batched, jobs, {})
    for j in jobs:
        assert seen.end(j).finish_reason == "stop"  # type: ignore[union-attr]
        jsonschema.validate(json.loads(seen.text(j)), SCHEMA)
        assert not set(ids_of(seen, j)) & set(control + special)


def test_bytes_that_spell_a_surrogate_never_get_into_a_json_string(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    """xgrammar's string rule takes ED A0-BF xx (an encoded surrogate, not UTF-8) as one
    character: such bytes decoded to three U+FFFD characters each, past the name's maxLength of
    6. Pushed as hard as a client can push them (the lead byte ED, and every token that begins
    with A0-BF), the name is still 6 characters at most, each one UTF-8 wrote (after ED, one just
    below U+D800)."""
    import xgrammar

    vocabulary = xgrammar.TokenizerInfo.from_huggingface(tiny_backend.tokenizer).decoded_vocab
    lead = vocabulary.index(b"\xed")
    high = [i for i, raw in enumerate(vocabulary) if raw and 0xA0 <= raw[0] <= 0xBF]
    favoured = dict.fromkeys([lead, *high], 100.0)
    jobs = [
        job(request(f"surrogates {i}", json_schema=SCHEMA, max_tokens=100, logit_bias=favoured))
        for i in range(2)
    ]
    seen = drive(batched, jobs, {})
    for j in jobs:
        text = seen.text(j)
        assert seen.end(j).finish_reason == "stop", text  # type: ignore[union-attr]
        assert "\ufffd" not in text, repr(text)
        answer = json.loads(text)
        jsonschema.validate(answer, SCHEMA)
        assert any("\ud000" <= c < "\ud800" for c in answer["name"]), repr(text)  # ED, then 80-9F
    # A token that spells a surrogate inside itself is never taken (no vocabulary here has one).
    bytes_of = [b"a", b"\xed\xa0", b"x\xed\xbf\x80", b"\xed\x9f\xbf", b"\xed", b"\xa0"]
    after = len(tiny_backend.tokenizer)  # past the tokenizer's own (special) ids
    banned = not_json_ids(tiny_backend.tokenizer, [b"a"] * after + bytes_of, set())
    assert {i - after for i in banned if i >= after} == {1, 2}


def test_plain_jobs_answer_as_alone_beside_constrained_ones_which_answer_as_they_do_alone(
    tiny_backend: Any, batched: BatchedCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.batch_lm
    import worker.logits_rules

    ruled_rows: list[int] = []
    real = worker.logits_rules.apply_rules  # what worker.batch_lm imported

    def counting(block: torch.Tensor, rules: Any) -> None:
        ruled_rows.append(block.shape[0])
        real(block, rules)

    monkeypatch.setattr(worker.batch_lm, "apply_rules", counting)
    reqs = [
        request("plain one", max_tokens=30),
        request("json one", json_schema=SCHEMA, max_tokens=100),
        request("plain two", temperature=0.9, seed=11, max_tokens=30),
        request("json two", json_schema=SCHEMA, temperature=1.0, seed=5, max_tokens=100),
        request("biased", logit_bias={40: 8.0}, frequency_penalty=0.5, max_tokens=30),
        request("plain three", max_tokens=30),
    ]
    jobs = [job(r) for r in reqs]
    seen = drive(batched, jobs[:4], {4: jobs[4:]})
    for j, r in zip(jobs, reqs, strict=True):
        assert (seen.text(j), seen.end(j).finish_reason) == alone(tiny_backend, r)  # type: ignore[union-attr]
    assert max(ruled_rows) <= 3  # only the rows of jobs with rules were copied and changed

    ruled_rows.clear()
    plain = [job(request(f"only plain {i}", max_tokens=10)) for i in range(3)]
    drive(batched, plain, {})
    assert ruled_rows == []  # a batch of plain jobs never leaves the fast path


def test_a_schema_xgrammar_cannot_compile_fails_that_job_only(tiny_backend: Any) -> None:
    model = BatchedCausalLM(tiny_backend, slots=3, max_len=512)
    with running_engine(model) as (engine, seen):
        good = job(request("good", max_tokens=20))
        bad = job(request("bad", json_schema={"type": "strong"}))
        dangling = job(request("bad ref", json_schema={"$ref": "#/definitions/nothing"}))
        for j in (good, bad, dangling):
            engine.submit(j)
        seen.wait(lambda: all(seen.end(j) is not None for j in (good, bad, dangling)))
        for j in (bad, dangling):
            end = seen.end(j)
            assert end is not None and end.finish_reason == "error"
            assert end.error_type == "invalid_request_error" and "response_format" in end.error_message
            assert end.error_param == "response_format"
            assert ".cc:" not in end.error_message and "[" not in end.error_message  # the reason only
        bad_end = seen.end(bad)
        assert 'Unsupported type "strong"' in (bad_end.error_message if bad_end else "")
        assert seen.text(good) == alone(tiny_backend, good.request)[0]
        assert engine.alive()
        # The worker's own refusals keep OpenAI's code (the front shows it: LiteLLM maps it).
        too_long = job(request("too long", max_tokens=600, max_tokens_given=True))
        engine.submit(too_long)
        seen.wait(lambda: seen.end(too_long) is not None)
        end = seen.end(too_long)
        assert end is not None and (end.error_param, end.error_code) == (
            "max_tokens",
            "context_length_exceeded",
        )
        record = final_record(end, 0.0)  # what the publisher writes: the job's hash and error event
        assert record.fields[JobField.ERROR_CODE] == "context_length_exceeded"
        assert json.loads(record.data.encode())["code"] == "context_length_exceeded"


def test_a_continued_job_under_a_grammar_still_ends_in_valid_json(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    whole = job(request("continue me", json_schema=SCHEMA, max_tokens=100))
    seen = drive(batched, [whole], {})
    ids = ids_of(seen, whole)
    half = len(ids) // 2
    greedy = job(request("continue me", json_schema=SCHEMA, max_tokens=100))
    greedy.resume_ids = ids[:half]
    sampled = job(request("continue me", json_schema=SCHEMA, max_tokens=100, temperature=1.0, seed=3))
    sampled.resume_ids = ids[:half]
    seen = drive(batched, [greedy, sampled], {})
    assert ids_of(seen, greedy) == ids[half:]  # the same greedy tokens as the run not interrupted
    for j in (greedy, sampled):
        assert seen.end(j).finish_reason == "stop"  # type: ignore[union-attr]
        text = tiny_backend.tokenizer.decode(ids[:half] + ids_of(seen, j), skip_special_tokens=True)
        jsonschema.validate(json.loads(text), SCHEMA)


def test_a_jobs_grammar_is_compiled_in_its_slot_thread_not_the_engines(tiny_backend: Any) -> None:
    """A schema can take seconds to compile (a long maxLength on a large vocabulary): the slot
    thread compiles it (``prepare``) before the job joins, so running jobs never wait on it."""
    import threading

    model = BatchedCausalLM(tiny_backend, slots=2, max_len=256)
    grammars = model._grammars
    compiled_in: list[str] = []
    compile_json_schema = grammars._grammar_compiler().compile_json_schema

    class Spy:
        def compile_json_schema(self, *args: Any, **kwargs: Any) -> Any:
            compiled_in.append(threading.current_thread().name)
            return compile_json_schema(*args, **kwargs)

    real = grammars._compiler
    grammars._compiler = Spy()  # the backend's grammars, which later tests share: put back below
    try:
        schema = {"type": "object", "properties": {"slot": {"enum": ["a", "b"]}}, "required": ["slot"]}
        j = job(request("prepare me", json_schema=schema, max_tokens=20))
        slot = threading.Thread(target=model.prepare, args=(j,), name="slot-7")
        slot.start()
        slot.join()
        seen = drive(model, [j], {})  # the engine's side, in this (main) thread
    finally:
        grammars._compiler = real
    assert compiled_in == ["slot-7"]
    assert json.loads(seen.text(j))["slot"] in ("a", "b")


def test_a_slow_grammar_holds_up_only_the_jobs_with_its_schema(tiny_backend: Any) -> None:
    """A schema that takes long to compile (seconds for a long maxLength on a large vocabulary)
    keeps no other job's grammar waiting: another schema compiles beside it, and a second job
    with the slow schema waits for its one compile instead of compiling it again."""
    import threading

    model = BatchedCausalLM(tiny_backend, slots=3, max_len=256)
    grammars = model._grammars
    real = grammars._grammar_compiler()
    entered, release = threading.Event(), threading.Event()
    compiled: list[str] = []

    class Slow:  # the compiler, held inside the slow schema's compile until released
        def compile_json_schema(self, text: str, **kwargs: Any) -> Any:
            compiled.append(text)
            if "slow" in text:
                entered.set()
                release.wait(30)
            return real.compile_json_schema(text, **kwargs)

    slow = {"type": "object", "properties": {"slow": {"type": "integer"}}, "required": ["slow"]}
    quick = {"type": "object", "properties": {"quick": {"type": "integer"}}, "required": ["quick"]}
    grammars._compiler = Slow()  # the backend's grammars, which later tests share: put back below
    try:
        first, again = (
            threading.Thread(target=model.prepare, args=(job(request(n, json_schema=slow)),)) for n in "ab"
        )
        first.start()
        assert entered.wait(30)
        again.start()
        other = threading.Thread(target=grammars.compiled, args=(request("c", json_schema=quick),))
        other.start()
        other.join(10)
        assert not other.is_alive(), "another schema's compile waited for the slow one"
        assert again.is_alive()  # waits for the compile under way
    finally:
        release.set()
        first.join(30)
        again.join(30)
        grammars._compiler = real
    assert [("slow" in text) for text in compiled] == [True, False]  # the slow schema compiled once
    assert grammars._compiling == {}  # no compile left in the books
    assert grammars.compiled(request("d", json_schema=slow)) is not None


def test_a_jobs_prompt_is_rendered_in_its_slot_thread_not_the_engines(tiny_backend: Any) -> None:
    """A chat template with tools takes milliseconds a prompt: the slot thread renders it
    (``prepare``), with a tokenizer of its own, so a burst of such jobs never holds back the
    running ones; the answer is the one the engine gives when it renders the prompt itself."""
    import threading

    model = BatchedCausalLM(tiny_backend, slots=2, max_len=256)
    rendered: list[tuple[str, bool]] = []  # (thread, with the model's own tokenizer)
    encode = type(tiny_backend).encode

    def spy(self: Any, prompt: Any, tokenizer: Any = None) -> list[int]:
        own = tokenizer is None or tokenizer is tiny_backend.tokenizer
        rendered.append((threading.current_thread().name, own))
        if prompt.messages and prompt.messages[-1].content == "refuse me":
            raise ValueError("the template refuses this turn")
        return encode(self, prompt, tokenizer)

    r = request("render me", max_tokens=12)
    alone_text = alone(tiny_backend, r)[0]
    type(tiny_backend).encode = spy
    try:
        j, refused = job(r), job(request("refuse me", max_tokens=12))
        for one in (j, refused):
            slot = threading.Thread(target=model.prepare, args=(one,), name="slot-3")
            slot.start()
            slot.join()
        ids = j.prompt_ids
        seen = drive(model, [j], {})  # the engine's side, in this (main) thread
        with pytest.raises(ValueError, match="the template refuses this turn"):
            model.add(refused)  # what the slot thread found, as the engine would have found it
    finally:
        type(tiny_backend).encode = encode
    assert rendered == [("slot-3", False), ("slot-3", False)]  # never the engine's thread
    assert ids == tiny_backend.encode(r) and j.prompt_ids is None  # handed over, not kept twice
    assert seen.text(j) == alone_text


def test_a_job_left_no_token_to_take_fails_alone_and_the_others_go_on(
    tiny_backend: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A schema no JSON value completes compiles, then its mask allows nothing; scores a tiny
    # repetition penalty overflows (the front refuses it; the worker may still meet such rows)
    # fail the job's draw. Each ends that job alone: the jobs beside it answer as they do alone.
    model = BatchedCausalLM(tiny_backend, slots=4, max_len=512)
    plain = [request("a long answer", max_tokens=60), request("sampled", temperature=0.9, seed=3)]
    bad = [
        request("cycle", json_schema={"$ref": "#"}),
        request("no string", json_schema={"type": "string", "pattern": "[^\\s\\S]"}, temperature=1.0),
        request("overflow", repetition_penalty=1e-300, temperature=1.0, seed=1),
    ]
    with running_engine(model) as (engine, seen):
        good = [job(r) for r in plain]
        for j in good:
            engine.submit(j)
        seen.wait(lambda: all(seen.text(j) for j in good))  # running when the bad ones join
        failing = [job(r) for r in bad]
        for j in failing:
            engine.submit(j)
        seen.wait(lambda: all(seen.end(j) is not None for j in good + failing))
        for j in good:
            assert (seen.text(j), seen.end(j).finish_reason) == alone(tiny_backend, j.request)  # type: ignore[union-attr]
        ends = [seen.end(j) for j in failing]
        assert all(end is not None and end.finish_reason == "error" for end in ends)
        for end in ends[:2]:
            assert end is not None and (end.error_type, end.error_param) == (
                "invalid_request_error",
                "response_format",
            )
            assert "the schema allows no token after the answer's first" in end.error_message
        assert ends[2] is not None and ends[2].error_type == "generation_error"
        assert "probability tensor" in ends[2].error_message
        assert engine.alive() and engine.steps > 0
        assert model.running == 0 and not model._held  # every row is free again
    assert "a generation step failed" not in caplog.text  # no step failed: only those jobs


def test_json_is_written_as_vllm_writes_it_and_a_vllm_run_is_continued_here(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    """Compact JSON (no space after ',' or ':'), as vLLM's engine writes it: a job a vLLM worker
    began and died on is continued here through the grammar (its tokens were refused by the
    grammar's spaced separators, and the job failed as the client's fault), and both engines give
    the same text. An earlier run the grammar refuses fails as the server's, not the request's."""
    seen = drive(batched, [whole := job(request("compact", json_schema=SCHEMA, max_tokens=100))], {})
    text = seen.text(whole)
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False), text

    vllm_wrote = tiny_backend.tokenizer.encode('{"name":"ab', add_special_tokens=False)
    continued = job(request("compact", json_schema=SCHEMA, max_tokens=100))
    continued.resume_ids = vllm_wrote
    seen = drive(batched, [continued], {})
    assert seen.end(continued).finish_reason == "stop"  # type: ignore[union-attr]
    jsonschema.validate(json.loads('{"name":"ab' + seen.text(continued)), SCHEMA)

    spaced = tiny_backend.tokenizer.encode('{"name": "ab', add_special_tokens=False)
    with pytest.raises(CannotContinue, match="send the request again"):
        batched._grammars.matcher(continued.request, spaced)
