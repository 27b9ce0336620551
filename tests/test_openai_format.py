"""The OpenAI request models and response builders, without a stack."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from api.completion_request import CompletionRequest
from api.errors import ApiError
from api.openai_format import CompletionFormat, CompletionStream
from api.openai_schemas import ChatCompletionRequest


def test_chat_request_becomes_a_job_request() -> None:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "max_tokens": 5,
            "max_completion_tokens": 7,
            "stop": "x",
            "n": 1,
            "user": "u1",
            "store": False,
        }
    )
    job = body.job_request()
    assert [(m.role, m.content) for m in job.chat_messages()] == [("system", "be brief"), ("user", "a\nb")]
    assert (job.model, job.max_tokens, job.stop) == ("m", 7, "x")
    assert not body.include_usage  # only streams send a usage chunk


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"n": 3}, "n"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0"),  # no tool_call_id
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages.0.content"),
        ({"messages": [{"role": "user"}]}, "messages.0"),
        ({"store": True}, "store"),
        ({"service_tier": "priority"}, "service_tier"),
        ({"reasoning_effort": "high"}, "reasoning_effort"),
        ({"web_search_options": {}}, "web_search_options"),
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"top_logprobs": 2}, None),  # without logprobs
        ({"stream_options": {"include_usage": True}}, None),  # without stream
        ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
        ({"min_p": 0.1}, "min_p"),  # not OpenAI's, not streamq's: unknown
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        (
            {"stream": True, "stream_options": {"include_obfuscation": True}},
            "stream_options.include_obfuscation",
        ),
    ],
)
def test_chat_fields_streamq_cannot_honour_are_refused_by_name(
    change: dict[str, object], param: str | None
) -> None:
    with pytest.raises(ValidationError) as refused:
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]} | change)
    where = [".".join(str(p) for p in e["loc"]) for e in refused.value.errors()]
    assert param is None or any(w.startswith(param) for w in where), where


def test_an_agent_loop_conversation_becomes_template_turns() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    body = ChatCompletionRequest.model_validate(
        {
            "messages": [
                {"role": "user", "content": "add"},
                {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None},
                {"role": "tool", "tool_call_id": "call_1", "name": "add", "content": "2"},
            ],
            "tools": [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}],
        }
    )
    turns = [m.template_turn() for m in body.job_request().chat_messages()]
    assert turns[1]["tool_calls"][0]["function"] == {"name": "add", "arguments": {"a": 1}}
    assert turns[2] == {"role": "tool", "content": "2", "tool_call_id": "call_1", "name": "add"}


def test_a_completion_prompt_is_raw_text_or_token_ids() -> None:
    def job_of(body: dict[str, Any]) -> Any:
        request = CompletionRequest.model_validate(body)
        (prompt,) = request.prompts()
        return request.job_request(prompt)

    job = job_of({"prompt": ["Once"], "max_tokens": 3})
    assert job.raw_prompt == "Once" and job.chat_messages() == []
    assert job_of({"prompt": [[1, 2, 3]]}).raw_prompt == [1, 2, 3]
    assert job_of({"prompt": [4, 5]}).raw_prompt == [4, 5]
    echoed = job_of({"prompt": [4, 5], "echo": True, "logprobs": 1})
    assert (echoed.logprobs, echoed.prompt_logprobs) == (1, 1)
    # A list of prompts (lm-eval's batch): a job each, in order.
    assert CompletionRequest.model_validate({"prompt": ["one", "two"]}).prompts() == ["one", "two"]
    assert CompletionRequest.model_validate({"prompt": [[1], [2, 3]]}).prompts() == [[1], [2, 3]]
    bad: dict[str, Any]
    for bad in (
        {"prompt": ""},
        {"prompt": []},
        {"prompt": ["one", ""]},
        {"prompt": [[1], []]},
        {"prompt": ["p"] * 65},
        {"prompt": "a", "suffix": "z"},
        {"prompt": "a", "best_of": 2},
    ):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)


def test_finish_reasons_are_openai_ones() -> None:
    chat = CompletionFormat("chat", "abc", "m", 1, include_usage=True)
    assert chat.id == "chatcmpl-abc"
    assert CompletionStream(chat).end("timeout", None)[0]["choices"][0]["finish_reason"] == "length"
    assert chat.response("hi", "stop", None)["choices"][0]["finish_reason"] == "stop"
    assert CompletionStream(chat).delta({"text": "hi"})[0]["usage"] is None
    text = CompletionFormat("text", "abc", "m", 1)
    assert text.id == "cmpl-abc" and CompletionStream(text).first() == []
    assert "usage" not in CompletionStream(text).delta({"text": "hi"})[0]
    assert text.response("hi", "length", {"prompt_tokens": 2, "completion_tokens": 3})["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }


def test_text_offsets_count_characters_a_token_may_split() -> None:
    from api.openai_format import entries_text, text_logprobs

    raw = "Hi 🙂 ok 我们".encode()
    entries = [
        {"token": raw[i : i + 2].decode("utf-8", "replace"), "logprob": -1.0, "bytes": list(raw[i : i + 2])}
        for i in range(0, len(raw), 2)
    ]
    assert entries_text(entries) == "Hi 🙂 ok 我们"
    offsets = text_logprobs(entries)["text_offset"]
    assert offsets == [0, 2, 3, 3, 5, 7, 8, 9, 9]  # "🙂" (4 bytes) and "我" (3) span two tokens each
    assert CompletionRequest.model_validate({"prompt": "a", "echo": True, "logprobs": 5}).job_request("a")
    with pytest.raises(ApiError) as refused:
        CompletionRequest.model_validate({"prompt": "a", "echo": True, "logprobs": 6}).job_request("a")
    assert refused.value.param == "logprobs"
