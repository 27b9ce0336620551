"""The OpenAI request models and response builders, without a stack."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.openai_format import CompletionFormat
from api.openai_schemas import ChatCompletionRequest, CompletionRequest


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
            "stream_options": {"include_usage": True},
            "tools": [{"type": "function"}],  # unknown here: ignored
        }
    )
    job = body.job_request()
    assert [(m.role, m.content) for m in job.chat_messages()] == [("system", "be brief"), ("user", "a\nb")]
    assert (job.model, job.max_tokens, job.stop) == ("m", 7, "x")
    assert not body.include_usage  # only streams send a usage chunk


@pytest.mark.parametrize(
    "change",
    [
        {"n": 3},
        {"messages": [{"role": "tool", "content": "x"}]},
        {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
        {"messages": [{"role": "user"}]},
    ],
)
def test_chat_requests_streamq_cannot_serve_are_refused(change: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}]} | change)


def test_completion_prompt_is_one_user_message() -> None:
    job = CompletionRequest.model_validate({"prompt": ["Once"], "max_tokens": 3}).job_request()
    assert [(m.role, m.content) for m in job.chat_messages()] == [("user", "Once")]
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": ["one", "two"]})


def test_finish_reasons_are_openai_ones() -> None:
    chat = CompletionFormat("chat", "abc", "m", 1, include_usage=True)
    assert chat.id == "chatcmpl-abc"
    assert chat.final_chunk("timeout")["choices"][0]["finish_reason"] == "length"
    assert chat.response("hi", "stop", None)["choices"][0]["finish_reason"] == "stop"
    assert chat.delta_chunk("hi")["usage"] is None
    text = CompletionFormat("text", "abc", "m", 1)
    assert text.id == "cmpl-abc" and text.first_chunk() is None
    assert "usage" not in text.delta_chunk("hi")
    assert text.response("hi", "length", {"prompt_tokens": 2, "completion_tokens": 3})["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
    }
