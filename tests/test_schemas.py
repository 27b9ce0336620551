"""Job requests: what is accepted, what is refused and why."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from shared.schemas import JobRequest


def test_prompt_and_history_become_messages() -> None:
    request = JobRequest(prompt="and now?", history=[("hi", "hello"), ("who are you", "a model")])
    assert [(m.role, m.content) for m in request.chat_messages()] == [
        ("user", "hi"),
        ("assistant", "hello"),
        ("user", "who are you"),
        ("assistant", "a model"),
        ("user", "and now?"),
    ]


def test_messages_are_kept_as_given() -> None:
    request = JobRequest.model_validate(
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}
    )
    assert [m.role for m in request.chat_messages()] == ["system", "user"]


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ({}, "'messages' or 'prompt' (or 'raw_prompt') is required"),
        ({"prompt": "a", "messages": [{"role": "user", "content": "b"}]}, "not both"),
        ({"messages": []}, "must not be empty"),
        ({"raw_prompt": [1, -2]}, "greater than or equal to 0"),
        ({"raw_prompt": "a", "tools": []}, "'tools' go with 'messages'"),
        ({"prompt": "a", "logprobs": 21}, "less than or equal to 20"),
        ({"prompt": "a", "temperature": -0.1}, "greater than or equal to 0"),
        ({"prompt": "a", "temperature": float("nan")}, "finite number"),
        ({"prompt": "a", "logit_bias": {"5": float("inf")}}, "finite number"),
        ({"prompt": "a", "top_p": -0.1}, "greater than or equal to 0"),
        ({"prompt": "a", "top_p": 1.5}, "less than or equal to 1"),
        ({"prompt": "a", "max_tokens": 0}, "greater than or equal to 1"),
        ({"prompt": "a", "stop": ""}, "must not be empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "'system', 'user', 'assistant' or 'tool'"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(body: dict[str, object], complaint: str) -> None:
    with pytest.raises(ValidationError) as info:
        JobRequest.model_validate(body)
    assert complaint in str(info.value)
