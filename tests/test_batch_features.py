"""What a job may ask of the transformers engine beyond sampling, on the tiny model (fp32): raw
prompts and tools, each honoured per job inside a batch of other jobs; the features the engine
offers; token ids outside the vocabulary refused. JSON answers, logit bias and penalties, and log
probabilities are tested in test_batch_structured_output.py, test_batch_penalties.py and
test_batch_logprobs.py."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from shared.schemas import ENGINE_FEATURES, TOOLS, GenerationRequest, ToolDefinition
from tests.engine_driving import drive, job, request
from worker.batch_lm import BatchedCausalLM


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
