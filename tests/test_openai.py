"""The OpenAI-compatible API, driven by the official ``openai`` package against the real stack."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Stack
from tests.sse import follow, text_of

pytestmark = pytest.mark.e2e

JOB_HEADER = "X-Streamq-Job-Id"


def model_of(stack: Stack) -> str:
    return stack.model_dir.name  # the served name: the model folder's name


def job_view(stack: Stack, job_id: str) -> dict[str, Any]:
    response = httpx.get(f"{stack.url}/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def wait_until_ended(stack: Stack, job_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (view := job_view(stack, job_id))["status"] not in ("finished", "failed", "canceled"):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    return view


def chat(client: openai.OpenAI, stack: Stack, content: str, **kwargs: Any) -> Any:
    return client.chat.completions.with_raw_response.create(
        model=model_of(stack), messages=[{"role": "user", "content": content}], **kwargs
    )


def test_chat_completion_answers_with_the_job_and_its_usage(
    client: openai.OpenAI, stack: Stack, tiny_backend: Any
) -> None:
    from tests.reference_answers import greedy_answer

    raw = chat(client, stack, "What is a queue?", max_tokens=12, temperature=0, user="u-1", seed=3)
    completion = raw.parse()
    job_id = raw.headers[JOB_HEADER]
    assert completion.id == f"chatcmpl-{job_id}"
    assert completion.object == "chat.completion"
    assert completion.model == model_of(stack)
    [choice] = completion.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == greedy_answer(tiny_backend, "What is a queue?", 12)
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    view = job_view(stack, job_id)
    assert view["status"] == "finished" and view["text"] == choice.message.content
    assert view["usage"]["completion_tokens"] == usage.completion_tokens

    # The same request with content as text parts, the model left empty (the one served model),
    # max_completion_tokens instead of max_tokens, and a field given as null (asks for nothing).
    again = client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": [{"type": "text", "text": "What is a queue?"}]}],
        max_completion_tokens=12,
        temperature=0,
        extra_body={"logit_bias": None},
    )
    assert again.model == model_of(stack)
    assert again.choices[0].message.content == choice.message.content
    # A field streamq does not know is refused by name, not ignored.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="", messages=[{"role": "user", "content": "hi"}], extra_body={"frobnicate": {"level": 3}}
        )
    assert refused.value.body["param"] == "frobnicate"  # type: ignore[index]


def test_chat_stream_sends_role_deltas_finish_usage_then_done(
    client: openai.OpenAI, stack: Stack, tiny_backend: Any
) -> None:
    from tests.reference_answers import greedy_answer

    raw = chat(
        client,
        stack,
        "Stream a queue",
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    job_id = raw.headers[JOB_HEADER]
    chunks = list(raw.parse())
    assert {c.id for c in chunks} == {f"chatcmpl-{job_id}"}
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    *with_choices, usage_chunk = chunks
    text = "".join(c.choices[0].delta.content or "" for c in with_choices)
    assert text == greedy_answer(tiny_backend, "Stream a queue", 20)
    assert len(with_choices) >= 3  # role, at least one delta, finish
    assert [c.choices[0].finish_reason for c in with_choices[:-1]] == [None] * (len(with_choices) - 1)
    assert with_choices[-1].choices[0].finish_reason in ("stop", "length")
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    view = job_view(stack, job_id)
    assert usage_chunk.usage.completion_tokens == view["usage"]["completion_tokens"] > 0
    assert usage_chunk.usage.prompt_tokens == view["usage"]["prompt_tokens"] > 0

    # On the wire: plain `data:` events, the last one [DONE]; no usage member unless asked.
    body = {"messages": [{"role": "user", "content": "Stream a queue"}], "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{stack.url}/v1/chat/completions", json=body, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    assert all("usage" not in json.loads(d) for d in data[:-1])


def test_text_completions_stream_and_not(client: openai.OpenAI, stack: Stack, tiny_backend: Any) -> None:
    from shared.schemas import GenerationRequest

    raw_prompt = GenerationRequest(text="Once upon a time", max_tokens=15, temperature=0.0, top_p=1.0)
    expected = "".join(step.delta for step in tiny_backend.generate(raw_prompt))  # no chat template
    raw = client.completions.with_raw_response.create(
        model=model_of(stack), prompt="Once upon a time", max_tokens=15, temperature=0
    )
    completion = raw.parse()
    assert completion.id == f"cmpl-{raw.headers[JOB_HEADER]}" and completion.object == "text_completion"
    assert completion.choices[0].text == expected
    assert completion.usage is not None and completion.usage.completion_tokens > 0

    chunks = list(
        client.completions.create(
            model=model_of(stack),
            prompt=["Once upon a time"],
            max_tokens=15,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    assert chunks[-2].choices[0].finish_reason == completion.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage == completion.usage


def test_models_lists_what_live_workers_serve(client: openai.OpenAI, stack: Stack) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_of(stack)]
    [model] = models.data
    assert model.object == "model" and model.owned_by == "streamq"
    assert 0 < model.created <= time.time()
    assert client.models.retrieve(model_of(stack)).id == model_of(stack)
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("no-such-model")
    assert (missing.value.code, missing.value.param) == ("model_not_found", "model")  # as OpenAI's


def test_a_stop_sequence_ends_the_answer_before_it(client: openai.OpenAI, stack: Stack) -> None:
    full = client.chat.completions.create(
        model=model_of(stack), messages=[{"role": "user", "content": "stop me"}], max_tokens=40, temperature=0
    )
    answer = full.choices[0].message.content or ""
    assert len(answer) > 20, answer
    stop = answer[12:16]
    cut = answer[: answer.index(stop)]
    for stream in (False, True):
        result = client.chat.completions.create(
            model=model_of(stack),
            messages=[{"role": "user", "content": "stop me"}],
            max_tokens=40,
            temperature=0,
            stop=[stop, "a stop sequence that never comes"],
            stream=stream,
        )
        if isinstance(result, openai.Stream):
            chunks = list(result)
            text = "".join(c.choices[0].delta.content or "" for c in chunks)
            finish = chunks[-1].choices[0].finish_reason
        else:
            text, finish = result.choices[0].message.content or "", result.choices[0].finish_reason
        assert (text, finish) == (cut, "stop")


def test_an_unknown_model_is_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.code == "model_not_found" and "gpt-9" in caught.value.message
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="hi", stream=True)


@pytest.mark.parametrize(
    ("kwargs", "param", "words"),
    [
        ({"n": 2}, "n", "only n=1"),
        ({"temperature": -1}, "temperature", "greater than or equal to 0"),
        ({"max_tokens": 0}, "max_tokens", "greater than or equal to 1"),
        ({"max_completion_tokens": 100_000}, "max_completion_tokens", "at most"),  # named as sent
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role", "'user'"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "messages.0.content",
            "image_url",
        ),
        ({"messages": []}, "messages", "at least 1"),
    ],
)
def test_bad_parameters_are_a_bad_request(
    client: openai.OpenAI, stack: Stack, kwargs: dict[str, Any], param: str, words: str
) -> None:
    body: dict[str, Any] = {"model": model_of(stack), "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(**(body | kwargs))
    error = caught.value
    assert error.type == "invalid_request_error"
    assert isinstance(error.param, str) and error.param.startswith(param), error.param
    assert words in error.message


def test_any_signed_64_bit_seed_and_a_null_stream_are_taken_as_openai_takes_them(
    client: openai.OpenAI, stack: Stack
) -> None:
    """OpenAI's seed is any 64-bit integer, negative ones included; ``"stream": null`` is a plain
    answer; a stream flag that is not a boolean is refused, naming it."""

    def sampled(seed: int) -> str:
        answer = chat(
            client, stack, "Pick words at random.", max_tokens=12, temperature=1.0, seed=seed
        ).parse()
        return str(answer.choices[0].message.content)

    assert sampled(-5) == sampled(-5) != sampled(5)
    assert sampled(-(2**63)) == sampled(-(2**63))
    body = {"model": model_of(stack), "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    plain = httpx.post(f"{stack.url}/v1/chat/completions", json=body | {"stream": None}, timeout=30)
    assert plain.status_code == 200 and plain.json()["object"] == "chat.completion", plain.text
    text_body = {"model": model_of(stack), "prompt": "hi", "max_tokens": 4, "stream": "yes"}
    refused = httpx.post(f"{stack.url}/v1/completions", json=text_body, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "stream", refused.text


def test_closing_a_stream_early_cancels_its_job(
    client: openai.OpenAI, stack: Stack, long_prompts: list[str]
) -> None:
    raw = chat(client, stack, long_prompts[0], max_tokens=1500, temperature=0, stream=True)
    job_id = raw.headers[JOB_HEADER]
    stream = raw.parse()
    for chunk in stream:
        if chunk.choices[0].delta.content:
            break  # output has begun; then the client hangs up
    stream.close()
    view = wait_until_ended(stack, job_id, timeout=10)  # it would end "finished", at 1500 tokens
    assert view["status"] == "canceled"
    assert view["usage"]["completion_tokens"] < 1500


def test_a_client_that_stops_waiting_cancels_its_job(stack: Stack, long_prompts: list[str]) -> None:
    started = time.time()
    with (
        openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0, timeout=0.3) as impatient,
        pytest.raises(openai.APITimeoutError),
    ):
        impatient.chat.completions.create(
            model=model_of(stack),
            messages=[{"role": "user", "content": long_prompts[1]}],
            max_tokens=1500,
            temperature=0,
        )
    r = stack.redis.client(decode_responses=True)
    mine = [
        key.split("{")[1].rstrip("}")
        for key in r.scan_iter("streamq:job:*")
        if long_prompts[1] in (r.hget(key, "request") or "")
        and float(r.hget(key, "created_at") or 0) >= started
    ]
    assert len(mine) == 1
    view = wait_until_ended(stack, mine[0], timeout=10)  # it would end "finished", at 1500 tokens
    assert view["status"] == "canceled" and view["usage"]["completion_tokens"] < 1500


def test_a_background_stream_runs_on_when_its_client_goes(
    client: openai.OpenAI, stack: Stack, long_prompts: list[str]
) -> None:
    raw = chat(
        client,
        stack,
        long_prompts[2],
        max_tokens=150,
        temperature=0,
        stream=True,
        extra_body={"background": True},
    )
    job_id = raw.headers[JOB_HEADER]
    stream = raw.parse()
    next(iter(stream))
    stream.close()
    view = wait_until_ended(stack, job_id)
    assert view["status"] == "finished"
    assert (view["finish_reason"], view["usage"]["completion_tokens"]) == ("length", 150)


def test_a_dropped_stream_is_resumed_from_the_job_on_another_front(
    client: openai.OpenAI, stack: Stack, long_prompts: list[str]
) -> None:
    request: dict[str, Any] = {
        "model": model_of(stack),
        "messages": [{"role": "user", "content": long_prompts[0]}],
        "max_tokens": 120,
        "temperature": 0,
    }
    raw = client.chat.completions.with_raw_response.create(
        **request, stream=True, extra_headers={"X-Streamq-Detach": "1"}
    )
    job_id = raw.headers[JOB_HEADER]
    got = ""
    for chunk in raw.parse():
        got += chunk.choices[0].delta.content or ""
        if got:
            break  # the connection drops here, with the answer begun
    raw.http_response.close()
    with httpx.Client(timeout=30) as other:
        events = follow(other, stack.url2, job_id)
    assert events[-1].event == "done"
    whole = text_of(events)
    assert whole.startswith(got) and len(whole) > len(got)
    assert whole == client.chat.completions.create(**request).choices[0].message.content


def test_a_job_canceled_mid_stream_ends_the_stream_with_an_error(
    client: openai.OpenAI, stack: Stack, long_prompts: list[str]
) -> None:
    raw = chat(client, stack, long_prompts[1], max_tokens=1500, temperature=0, stream=True)
    job_id = raw.headers[JOB_HEADER]

    def read_and_cancel() -> None:
        for received, chunk in enumerate(raw.parse()):
            if received == 2:  # the role, then some output: now someone cancels the job
                assert chunk.choices[0].delta.content
                assert httpx.post(f"{stack.url2}/v1/jobs/{job_id}/cancel").status_code == 200

    with pytest.raises(openai.APIError) as caught:
        read_and_cancel()
    assert "canceled" in caught.value.message
    assert isinstance(caught.value.body, dict) and caught.value.body["code"] == "job_canceled"
    assert job_view(stack, job_id)["status"] == "canceled"
