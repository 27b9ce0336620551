"""What a job may ask of the transformers engine beyond sampling, on the tiny model (fp32): JSON
answers (grammar-constrained), logit bias, penalties, log probabilities of the answer and of the
prompt, raw prompts and tools, each honoured per job inside a batch of other jobs. References
are computed apart: full forward passes without a cache, HF's logits processors, jsonschema."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import jsonschema
import pytest
import torch

from shared.schemas import ENGINE_FEATURES, TOOLS, GenerationRequest, ToolDefinition
from tests.test_engine import alone, drive, job, request, running_engine
from worker.batch_lm import BatchedCausalLM
from worker.engine import EngineJob, JobOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "color": {"enum": ["red", "green", "blue"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 3},
    },
    "required": ["name", "color", "age", "tags"],
    "additionalProperties": False,
}


@pytest.fixture
def batched(tiny_backend: Any) -> BatchedCausalLM:
    return BatchedCausalLM(tiny_backend, slots=4, max_len=512, prefill_chunk=16)


def outputs_of(seen: Any, j: EngineJob) -> list[JobOutput]:
    return [o for _, o in seen.outputs if o.job is j]


def ids_of(seen: Any, j: EngineJob) -> list[int]:
    return [t for o in outputs_of(seen, j) for t in o.token_ids]


def full_logprobs(backend: Any, ids: list[int]) -> torch.Tensor:
    """log_softmax of one forward pass over ``ids`` without a cache: ``[len(ids), vocab]``."""
    with torch.inference_mode():
        return torch.log_softmax(backend.model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


# Structured output.


@pytest.mark.parametrize(
    "sampling", [{}, {"temperature": 1.0, "seed": 7}, {"temperature": 0.8, "top_p": 0.9}]
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


def test_plain_jobs_answer_as_alone_beside_constrained_ones_which_answer_as_they_do_alone(
    tiny_backend: Any, batched: BatchedCausalLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.batch_lm

    ruled_rows: list[int] = []
    real = worker.batch_lm.apply_rules

    def counting(block: torch.Tensor, rules: Any, allowed: Any) -> None:
        ruled_rows.append(block.shape[0])
        real(block, rules, allowed)

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
        assert seen.text(good) == alone(tiny_backend, good.request)[0]
        assert engine.alive()


def test_ids_outside_the_vocabulary_are_refused_naming_the_field(batched: BatchedCausalLM) -> None:
    from shared.limits import InvalidJobRequest

    with pytest.raises(InvalidJobRequest, match="vocabulary") as caught:
        batched.add(job(request("x", logit_bias={10**6: 1.0})))
    assert caught.value.param == "logit_bias"
    raw = GenerationRequest(token_ids=[1, 10**6], max_tokens=4, temperature=0, top_p=1)
    with pytest.raises(InvalidJobRequest, match="vocabulary") as caught:
        batched.add(job(raw))
    assert caught.value.param == "raw_prompt"
    assert batched.ready_in() is None  # nothing was taken


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


# Logit bias and penalties.


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


# Log probabilities.


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
    for j, r in zip(jobs, reqs, strict=True):
        outputs = outputs_of(seen, j)
        entries = [e for o in outputs for e in o.logprobs]
        for o in outputs:
            assert len(o.logprobs) == (len(o.token_ids) if r.logprobs is not None else 0)
        if r.logprobs is None:
            assert entries == []
            continue
        assert len(entries) == j.completion_tokens
        check_entries(tiny_backend, tiny_backend.encode(r), ids_of(seen, j), entries, r.logprobs)
        joined = b"".join(bytes(e.bytes or []) for e in entries).decode("utf-8", errors="replace")
        assert joined == seen.text(j)
        for e in entries:
            values = [t.logprob for t in e.top_logprobs]
            assert values == sorted(values, reverse=True)
    assert seen.end(jobs[2]).finish_reason == "stop"  # type: ignore[union-attr]  # its end has no entry


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


# Raw prompts, tools, features.


def test_a_raw_text_prompt_and_its_token_ids_give_the_same_answer(
    tiny_backend: Any, batched: BatchedCausalLM
) -> None:
    text = "The quick brown fox jumps"
    ids = tiny_backend.tokenizer(text, add_special_tokens=True)["input_ids"]
    common = {"max_tokens": 25, "temperature": 0.0, "top_p": 1.0}
    as_text, as_ids = (
        job(GenerationRequest(text=text, **common)),
        job(GenerationRequest(token_ids=ids, **common)),
    )
    chat = job(request(text, max_tokens=25))
    seen = drive(batched, [as_text, as_ids, chat], {})
    assert as_text.prompt_tokens == as_ids.prompt_tokens == len(ids)
    assert seen.text(as_text) == seen.text(as_ids) and seen.text(as_text)
    assert chat.prompt_tokens > len(ids)  # the chat template was not used for the raw ones


def test_tools_reach_the_chat_template(tiny_backend: Any, batched: BatchedCausalLM) -> None:
    tool = ToolDefinition.model_validate(
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    )
    with_tools = job(request("weather?", tools=[tool], max_tokens=10))
    without = job(request("weather?", max_tokens=10))
    seen = drive(batched, [with_tools, without], {})
    assert with_tools.prompt_tokens > without.prompt_tokens + 20
    assert seen.end(with_tools) is not None


def test_the_engine_offers_every_feature_and_tools_only_with_a_template_that_takes_them(
    tiny_backend: Any,
) -> None:
    from worker.causal_lm import CausalLMChat

    assert BatchedCausalLM(tiny_backend, slots=1, max_len=64).features == ENGINE_FEATURES
    tokenizer = copy.deepcopy(tiny_backend.tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plain = CausalLMChat(tiny_backend.model, tokenizer, "plain", "cpu", "float32")
    assert BatchedCausalLM(plain, slots=1, max_len=64).features == ENGINE_FEATURES - {TOOLS}


def test_neutral_values_keep_a_job_on_the_plain_path(batched: BatchedCausalLM) -> None:
    neutral = request(
        "neutral", presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, logit_bias={}
    )
    j = job(neutral)
    batched.add(j)
    assert batched._held[j].rules is None and batched._held[j].logprobs is None


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

    grammars._compiler = Spy()
    schema = {"type": "object", "properties": {"slot": {"enum": ["a", "b"]}}, "required": ["slot"]}
    r = request("prepare me", json_schema=schema, max_tokens=20)
    slot = threading.Thread(target=model.prepare, args=(r,), name="slot-7")
    slot.start()
    slot.join()
    j = job(r)
    seen = drive(model, [j], {})  # the engine's side, in this (main) thread
    assert compiled_in == ["slot-7"]
    assert json.loads(seen.text(j))["slot"] in ("a", "b")
