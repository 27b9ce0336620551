"""streamq's vLLM engine (``VLLMModel``) in this process, stepped as the engine thread steps it:
a request whose schema no JSON value completes fails alone, with a 400 naming
``response_format`` (vLLM ends it with "error" once its grammar refuses the token it took), while
a job beside it answers whole; an answer that ends on its end of sequence keeps that token's
log-probability entry and counts it, as lm-eval's loglikelihood needs; the grammar of strict
functions' calls (api.strict_tools) is taken as vLLM's structural tag."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from shared.limits import InvalidJobRequest
from tests.engine_driving import drive, job, request
from tests.engine_outputs import outputs_of
from tests.vllm_required import need_vllm

need_vllm()

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def vllm_model(hd64_model: Path) -> Any:
    from shared.settings import Settings
    from worker.vllm_setup import build_vllm_model, load_vllm_served

    settings = Settings(
        model=str(hd64_model), engine="vllm", dtype="float32", vllm_eager=True, kv_cache_gib=0.25,
        max_seq_len=512, slots=4,
    )  # fmt: skip
    model, _ = build_vllm_model(settings, load_vllm_served(settings, "row-failures", "cpu"))
    return model


def test_a_schema_no_value_completes_fails_alone_with_a_400_naming_it(vllm_model: Any) -> None:
    eos = vllm_model.served.tokenizer.convert_tokens_to_ids("<|im_end|>")
    plain = job(request("a long answer", max_tokens=40, logit_bias={eos: -100.0}))
    cycle = job(request("cycle", json_schema={"$ref": "#"}))
    no_match = {"type": "string", "pattern": "[^\\s\\S]"}
    nothing = job(request("no string", json_schema=no_match, temperature=1.0))
    seen = drive(vllm_model, [plain], {2: [cycle, nothing]})
    assert seen.end(plain) is not None and seen.end(plain).finish_reason == "length"  # type: ignore[union-attr]
    assert plain.completion_tokens == 40
    for failed in (cycle, nothing):
        end = seen.end(failed)
        assert end is not None and end.finish_reason == "error"
        assert (end.error_type, end.error_param) == ("invalid_request_error", "response_format")
        assert "the schema allows no token after the answer's first" in end.error_message
    # The token vLLM took where the mask left none, which the grammar refused, is not the answer's.
    assert seen.text(cycle) == "" and "after the answer's first 0 tokens" in seen.end(cycle).error_message  # type: ignore[union-attr]
    assert not vllm_model._held  # every request is out of vLLM


def test_a_schema_vllms_grammar_compiler_cannot_build_is_a_400_naming_it(vllm_model: Any) -> None:
    """vLLM's xgrammar (its cache on) fails to build a pattern that repeats one class more than
    128 times, and vLLM ends the request with "error" before a token: a 400 naming the field and
    how to write the pattern (it was a 502 the SDK sent three times), while the split pattern
    runs."""
    long = {"type": "object", "properties": {"t": {"type": "string", "pattern": "^[a-z]{1,200}$"}}}
    split = {
        "type": "object",
        "properties": {"t": {"type": "string", "pattern": "^[a-z]{1,128}[a-z]{0,72}$"}},
    }
    failed, ran = (
        job(request("t?", json_schema=long, max_tokens=8)),
        job(request("t?", json_schema=split, max_tokens=8)),
    )
    seen = drive(vllm_model, [failed, ran], {})
    end = seen.end(failed)
    assert end is not None and end.finish_reason == "error", end
    assert (end.error_type, end.error_param) == ("invalid_request_error", "response_format")
    assert "could not build this schema's grammar" in end.error_message and "{1,128}" in end.error_message
    other = seen.end(ran)
    assert other is not None and not other.error_type, other
    assert not vllm_model._held


def test_an_answer_ending_on_its_end_of_sequence_has_an_entry_for_it(vllm_model: Any) -> None:
    eos = vllm_model.served.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ended = job(request("end now", logprobs=2, logit_bias={eos: 100.0}, max_tokens=5))
    seen = drive(vllm_model, [ended], {})
    end = seen.end(ended)
    assert end is not None and end.finish_reason == "stop" and seen.text(ended) == ""
    entries = [e for o in outputs_of(seen, ended) for e in o.logprobs]
    assert [e.token for e in entries] == ["<|im_end|>"] and entries[0].bytes == []
    assert entries[0].logprob is not None and entries[0].logprob < 0  # its raw log probability
    assert ended.completion_tokens == 1


def test_the_strict_calls_grammar_is_taken_as_a_structural_tag(vllm_model: Any) -> None:
    from api.strict_tools import strict_calls_grammar
    from shared.schemas import ToolDefinition
    from worker.vllm_engine import structured_outputs

    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    given = [
        ToolDefinition.model_validate(
            {"type": "function", "function": {"name": "w", "parameters": weather, "strict": True}}
        )
    ]
    strict = request("weather?", structural_tag=strict_calls_grammar(given), max_tokens=12)
    assert json.loads(structured_outputs(strict).structural_tag) == strict.structural_tag
    seen = drive(vllm_model, [ran := job(strict)], {})
    end = seen.end(ran)
    assert end is not None and end.finish_reason in ("stop", "length") and not end.error_type, end
    assert ran.completion_tokens > 0 and not vllm_model._held


def test_tools_beside_a_json_format_are_one_structural_tag(vllm_model: Any) -> None:
    """vLLM's engine takes the calls-or-JSON tag; a greedy answer is the JSON or calls."""
    from api.strict_tools import calls_or_json_grammar
    from api.tool_calls import plan_tools, read_whole
    from shared.schemas import ToolDefinition

    given = [
        ToolDefinition.model_validate(
            {"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}
        )
    ]
    answer = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    asked = request("sum?", structural_tag=calls_or_json_grammar(given, answer), max_tokens=40)
    seen = drive(vllm_model, [ran := job(asked)], {})
    end = seen.end(ran)
    assert end is not None and end.finish_reason == "stop" and not end.error_type, (end, seen.text(ran))
    text = seen.text(ran)
    _, calls = read_whole(plan_tools(given, "auto", None), "j", text, cut=False)
    assert calls or isinstance(json.loads(text)["n"], int), text
    # The JSON answer's mask, not strict calls' (which keeps tabs: xgrammar lets a raw tab into a
    # string with a length limit): a tab pushed as hard as a client can push it stays out.
    tokenizer = vllm_model.served.tokenizer
    tabs = [i for i in tokenizer.encode("a\tb\t", add_special_tokens=False) if "\t" in tokenizer.decode([i])]
    named = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 6}}, "required": ["s"]}
    pushed = request(
        "s?",
        structural_tag=calls_or_json_grammar(given, named),
        logit_bias=dict.fromkeys(tabs, 100.0),
        max_tokens=40,
    )
    seen = drive(vllm_model, [ran := job(pushed)], {})
    text = seen.text(ran)
    _, calls = read_whole(plan_tools(given, "auto", None), "j", text, cut=False)
    assert calls or len(json.loads(text)["s"]) <= 6, repr(text)
    # A schema vLLM's check refuses, in the JSON answer beside the tools: refused, naming it (vLLM
    # says only "Invalid structural tag specification").
    unicode_class = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^\\p{L}+$"}}}
    refused = request("a?", structural_tag=calls_or_json_grammar(given, unicode_class), max_tokens=4)
    with pytest.raises(InvalidJobRequest) as refusal:
        vllm_model.add(job(refused))
    assert refusal.value.param == "response_format", refusal.value


def test_bytes_that_spell_a_surrogate_never_get_into_a_json_string(vllm_model: Any) -> None:
    """xgrammar's string rule takes ED A0-BF xx (an encoded surrogate, not UTF-8) as one
    character (3 of 15 sampled answers of a user's trial held such bytes): pushed as hard as a
    client can push them, the mask keeps them out, and the string keeps its maxLength."""
    import xgrammar

    vocabulary = xgrammar.TokenizerInfo.from_huggingface(vllm_model.served.tokenizer).decoded_vocab
    high = [i for i, raw in enumerate(vocabulary) if raw and 0xA0 <= raw[0] <= 0xBF]
    favoured = dict.fromkeys([vocabulary.index(b"\xed"), *high], 100.0)
    named = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 6}}, "required": ["s"]}
    jobs = [job(request(f"s {i}?", json_schema=named, logit_bias=favoured, max_tokens=60)) for i in range(2)]
    seen = drive(vllm_model, jobs, {})
    for ran in jobs:
        text = seen.text(ran)
        assert seen.end(ran).finish_reason == "stop" and "\ufffd" not in text, repr(text)  # type: ignore[union-attr]
        answer = json.loads(text)["s"]
        assert len(answer) <= 6 and any("\ud000" <= c < "\ud800" for c in answer), repr(text)
