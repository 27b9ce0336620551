"""A worker's refusal of a length that cannot fit its context (when the front could not count
the prompt) reaches the client as the front's own would: OpenAI's code, and the field and the
prompt named as each route calls them. Through the official SDK over the in-memory job system,
whose jobs fail with the error the worker's rule (``answer_budget``) raises."""

from __future__ import annotations

from typing import Any

import pytest
from openai import APIError, BadRequestError

from shared.limits import InvalidJobRequest, answer_budget
from shared.schemas import ChatMessage, GenerationRequest, JobError
from tests.fast.conftest import Front, openai_of

pytestmark = pytest.mark.anyio

MODEL = "fake-model"
CONTEXT, PROMPT_TOKENS, ASKED = 64, 5, 100


def _workers_refusal() -> JobError:
    request = GenerationRequest(
        messages=[ChatMessage(role="user", content="hi")],
        max_tokens=ASKED,
        max_tokens_given=True,
        temperature=1.0,
        top_p=1.0,
    )
    with pytest.raises(InvalidJobRequest) as refused:
        answer_budget(request, PROMPT_TOKENS, CONTEXT)
    exc = refused.value
    return JobError(type="invalid_request_error", message=str(exc), param=exc.param, code=exc.code)


def _says(body: Any, param: str, prompt: str) -> None:
    assert (body["param"], body["code"]) == (param, "context_length_exceeded"), body
    assert body["message"].startswith(
        f"This model's maximum context length is {CONTEXT} tokens. However, you requested "
        f"{PROMPT_TOKENS + ASKED} tokens ({PROMPT_TOKENS} in the {prompt}, {ASKED} in the completion)."
    ), body
    assert body["message"].endswith(f"Please reduce the length of the {prompt} or completion ('{param}')."), (
        body
    )


async def test_chat_names_the_length_field_as_the_client_sent_it(front: Front) -> None:
    front.jobs.fail_with = _workers_refusal()
    client = openai_of(front)
    ask: Any = [{"role": "user", "content": "hi"}]
    for field in ("max_tokens", "max_completion_tokens"):
        length: dict[str, Any] = {field: ASKED}
        with pytest.raises(BadRequestError) as refused:
            await client.chat.completions.create(model=MODEL, messages=ask, **length)
        _says(refused.value.body, field, "messages")
        assert refused.value.code == "context_length_exceeded"  # what LiteLLM and others key on
    stream = await client.chat.completions.create(
        model=MODEL, messages=ask, max_completion_tokens=ASKED, stream=True
    )
    with pytest.raises(APIError) as in_stream:  # the SDK raises the stream's error event
        _ = [chunk async for chunk in stream]
    body: Any = getattr(in_stream.value, "body", None)
    _says(body, "max_completion_tokens", "messages")


async def test_completions_and_responses_call_the_prompt_as_they_do(front: Front) -> None:
    front.jobs.fail_with = _workers_refusal()
    client = openai_of(front)
    with pytest.raises(BadRequestError) as refused:
        await client.completions.create(model=MODEL, prompt="hi", max_tokens=ASKED)
    _says(refused.value.body, "max_tokens", "prompt")
    with pytest.raises(BadRequestError) as refused:
        await client.responses.create(model=MODEL, input="hi", max_output_tokens=ASKED)
    _says(refused.value.body, "max_output_tokens", "input")
    events = [e async for e in await client.responses.create(model=MODEL, input="hi", stream=True)]
    error: Any = next(e for e in events if e.type == "error")
    assert (error.code, error.param) == ("context_length_exceeded", "max_output_tokens"), error
    polled = await client.responses.create(model=MODEL, input="hi", max_output_tokens=ASKED, background=True)
    again = await client.responses.retrieve(polled.id)
    assert again.status == "failed" and again.error is not None
    assert "(5 in the input, 100 in the completion)" in again.error.message
    job = (await front.http.get(f"/v1/jobs/{again.id.removeprefix('resp_')}")).json()
    assert job["error"]["code"] == "context_length_exceeded"
