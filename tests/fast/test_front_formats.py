"""The OpenAI routes (through the official SDK) and the seed's ChatGLM routes over the in-memory
job system: shapes, finish reasons, usage, streaming framing."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from openai import BadRequestError, InternalServerError
from openai.types.chat import ChatCompletionMessageParam

from api.errors import ApiError
from shared.job_store.payloads import Failed
from shared.job_store.vocabulary import EventName, FinishReason, JobStatus
from shared.schemas import JobView
from tests.fast.conftest import KEY_A, Front, openai_of, settled

pytestmark = pytest.mark.anyio

ASK: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three four"}]


async def test_chat_completion_shape_usage_and_finish_reasons(front: Front) -> None:
    client = openai_of(front)
    whole = await client.chat.completions.create(model="fake-model", messages=ASK)
    choice = whole.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        "one two three four",
        "stop",
    )
    assert whole.usage is not None and whole.usage.completion_tokens == 4
    assert whole.model == "fake-model" and whole.object == "chat.completion"

    cut = await client.chat.completions.create(model="fake-model", messages=ASK, max_tokens=2)
    assert (cut.choices[0].message.content, cut.choices[0].finish_reason) == ("one two", "length")


async def test_streamed_chat_completion_chunks_add_up_to_the_answer(front: Front) -> None:
    client = openai_of(front)
    stream = await client.chat.completions.create(
        model="fake-model",
        messages=ASK,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    assert len({c.id for c in chunks}) == 1


async def test_text_completion_and_models(front: Front) -> None:
    client = openai_of(front)
    done = await client.completions.create(model="fake-model", prompt="alpha beta")
    assert (done.choices[0].text, done.object) == ("alpha beta", "text_completion")
    models = await client.models.list()
    assert [m.id for m in models.data] == ["fake-model"]


async def test_openai_errors_come_in_openai_shape(front: Front) -> None:
    client = openai_of(front)
    with pytest.raises(BadRequestError) as refused:
        await client.chat.completions.create(model="fake-model", messages=ASK, n=2)
    assert refused.value.status_code == 400 and "n" in str(refused.value.body)


async def test_the_seed_chat_route_answers_with_history(front: Front) -> None:
    response = await front.http.post("/", json={"prompt": "hi you", "history": [["a", "b"]]})
    assert response.status_code == 200
    body = response.json()
    assert (body["response"], body["status"]) == ("hi you", 200)
    assert body["history"] == [["a", "b"], ["hi you", "hi you"]]
    assert response.headers["x-streamq-job-id"]
    # A ChatGLM3-style turn is refused saying what a turn is here, not "a valid tuple".
    chatglm3 = {"prompt": "hi", "history": [["a", "b"], {"role": "user", "content": "a"}]}
    refused = await front.http.post("/", json=chatglm3)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "history", refused.text
    assert "turn 1 is not" in refused.json()["error"]["message"], refused.text
    assert not [job for job in front.jobs.jobs.values() if job.request.messages[-1].content == "hi"]


async def test_the_seed_routes_read_json_sent_without_a_content_type(front: Front) -> None:
    """ChatGLM-6B's clients post ``data=json.dumps(...)``, with no Content-Type, and ``curl -d``
    without ``-H`` posts it as a form: the seed read any body as JSON, and its routes still do;
    the other routes say what to send instead of a puzzling 400."""
    body = json.dumps({"prompt": "hi you", "history": []}).encode()
    answered = await front.http.post("/", content=body)
    assert "content-type" not in answered.request.headers
    assert (answered.status_code, answered.json()["response"]) == (200, "hi you")
    async with front.http.stream("POST", "/stream", content=body) as response:
        assert [c for c in (await response.aread()).decode().split("<^>") if c] == ["hi", "hi you"]
    for kind in ("application/x-www-form-urlencoded", "text/plain; charset=utf-8"):
        as_curl = await front.http.post("/", content=body, headers={"content-type": kind})
        assert (as_curl.status_code, as_curl.json()["response"]) == (200, "hi you"), as_curl.text
        async with front.http.stream(
            "POST", "/stream", content=body, headers={"content-type": kind}
        ) as response:
            assert [c for c in (await response.aread()).decode().split("<^>") if c] == ["hi", "hi you"]
    bad = await front.http.post("/", content=b'{"prompt": 1}', headers={"content-type": "text/plain"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt", bad.text
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):  # JSON, not an object
        not_object = await front.http.post("/", content=b"[]", headers=headers)
        error = not_object.json()["error"]
        assert not_object.status_code == 400 and "valid dictionary" in error["message"], not_object.text
    binary = await front.http.post("/", content=body, headers={"content-type": "application/octet-stream"})
    assert binary.status_code == 415 and "Content-Type: application/json" in binary.json()["error"]["message"]
    for headers in ({}, {"content-type": "text/plain"}, {"content-type": "text/json"}):
        refused = await front.http.post("/v1/jobs", content=b'{"prompt": "hi"}', headers=headers)
        error = refused.json()["error"]
        assert refused.status_code == 415, refused.text
        assert "Content-Type: application/json" in error["message"], error
    json_kind = {"content-type": "application/vnd.api+json; charset=utf-8"}
    taken = await front.http.post("/v1/jobs", content=b'{"prompt": "hi"}', headers=json_kind)
    assert taken.status_code == 202, taken.text
    documented = (await front.http.get("/openapi.json")).json()["paths"]["/v1/jobs"]["post"]["responses"]
    assert "415" in documented


async def test_the_seed_stream_sends_the_whole_answer_so_far_each_time(front: Front) -> None:
    async with front.http.stream("POST", "/stream", json={"prompt": "a b c"}) as response:
        body = (await response.aread()).decode()
    chunks = [c for c in body.split("<^>") if c]
    assert chunks == ["a", "a b", "a b c"]


async def test_a_seed_stream_error_after_output_is_a_last_chunk_with_the_envelope(front: Front) -> None:
    front.jobs.pause_after = 1  # one word out, then the job waits: another client cancels it
    streaming = asyncio.ensure_future(front.http.post("/stream", json={"prompt": "x y"}))
    await front.jobs.submitted.wait()  # the fake wrote its first word within the submit
    job_id = next(iter(front.jobs.jobs))
    canceled = await front.http.post(f"/v1/jobs/{job_id}/cancel")
    response = await streaming
    assert canceled.json()["status"] == "canceled"
    assert response.headers["x-streamq-job-id"] == job_id
    chunks = response.text.split("<^>")[1:]
    assert chunks[0] == "x"
    assert json.loads(chunks[-1])["error"]["code"] == "job_canceled"


async def test_a_list_of_prompts_is_a_job_each_answered_as_the_choices_in_order(front: Front) -> None:
    """lm-evaluation-harness sends its batch (batch_size > 1) as one request: a 400 before."""
    client = openai_of(front)
    prompts = ["one two", "three", "four five six"]
    raw = await client.completions.with_raw_response.create(
        model="fake-model", prompt=prompts, max_tokens=2, logprobs=1
    )
    whole = raw.parse()
    assert [(c.index, c.text, c.finish_reason) for c in whole.choices] == [
        (0, "one two", "stop"),
        (1, "three", "stop"),
        (2, "four five", "length"),
    ]
    assert [c.logprobs and c.logprobs.tokens for c in whole.choices] == [
        ["one", " two"],
        ["three"],
        ["four", " five"],
    ]
    assert whole.usage is not None and whole.usage.completion_tokens == 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 5
    ids = raw.headers["X-Streamq-Job-Id"].split(",")
    assert len(ids) == 3 and set(ids) == set(front.jobs.jobs)
    assert [front.jobs.jobs[i].request.text for i in ids] == prompts  # each job its own prompt, in order
    token_ids = await client.completions.create(model="fake-model", prompt=[[1, 2], [3]], echo=True)
    # Each answer begins with its own prompt (the fake model answers a prompt back, so twice).
    assert [c.text for c in token_ids.choices] == ["t1 t2" * 2, "t3" * 2]


async def test_a_list_of_prompts_is_not_streamed_and_a_refused_one_cancels_the_rest(
    front: Front, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = openai_of(front)
    with pytest.raises(BadRequestError) as refused:
        await client.completions.create(model="fake-model", prompt=["a", "b"], stream=True)
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == "stream", body
    assert not front.jobs.jobs

    front.jobs.hold = True  # the first job waits in its queue while the second is refused
    submit = front.jobs.submit
    submitted: list[JobView] = []

    async def refuse_the_second(request: Any, caller: Any) -> Any:
        if submitted:  # as a prompt too long for the model's context is refused at submit
            raise ApiError(400, "too long for the context", param="messages", code="context_length_exceeded")
        submitted.append(await submit(request, caller))
        return submitted[-1]

    monkeypatch.setattr(front.jobs, "submit", refuse_the_second)
    with pytest.raises(BadRequestError) as too_long:
        await client.completions.create(model="fake-model", prompt=["a", "b"])
    assert isinstance(too_long.value.body, dict) and too_long.value.body["param"] == "prompt.1"  # which one
    # Canceled before the answer (a quick retry found the key's quota taken by it).
    assert front.jobs.jobs[submitted[0].id].view.status == JobStatus.CANCELED


async def test_a_failed_prompt_of_a_list_fails_the_request_and_cancels_the_others(front: Front) -> None:
    front.jobs.pause_after = 1  # every job stops after its first word
    client = openai_of(front)
    request = asyncio.create_task(client.completions.create(model="fake-model", prompt=["a b", "c d", "e f"]))
    await settled(lambda: len(front.jobs.jobs) == 3 and all(j.written for j in front.jobs.jobs.values()))
    first = next(iter(front.jobs.jobs.values()))
    failure = Failed(type="server_error", message="the worker broke").encode()
    front.jobs._end(first, JobStatus.FAILED, EventName.ERROR, failure, FinishReason.ERROR)
    with pytest.raises(InternalServerError) as failed:
        await request
    assert "the worker broke" in str(failed.value)
    others = [j for j in front.jobs.jobs.values() if j is not first]
    await settled(lambda: all(j.view.status == JobStatus.CANCELED for j in others))


async def test_max_tokens_zero_with_echo_scores_the_prompt_alone(front: Front) -> None:
    """Legacy OpenAI's and vLLM's way to score a prompt: ``max_tokens: 0`` with ``echo`` answers
    the prompt alone, with its tokens' logprobs, streamed or not; without echo it is a 400."""
    client = openai_of(front)
    whole = await client.completions.create(
        model="fake-model", prompt=[[7, 8, 9]], max_tokens=0, echo=True, logprobs=1
    )
    choice = whole.choices[0]
    assert (choice.text, choice.finish_reason) == ("t7 t8 t9", "length")
    assert choice.logprobs is not None and choice.logprobs.tokens == ["t7", " t8", " t9"]
    assert whole.usage is not None and whole.usage.completion_tokens == 0
    assert whole.usage.total_tokens == whole.usage.prompt_tokens
    assert [job.request.max_tokens for job in front.jobs.jobs.values()] == [1]
    stream = await client.completions.create(
        model="fake-model",
        prompt="say it",
        max_tokens=0,
        echo=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "say it"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 0
    listed = await client.completions.create(model="fake-model", prompt=["a b", "c"], max_tokens=0, echo=True)
    assert [c.text for c in listed.choices] == ["a b", "c"]
    with pytest.raises(BadRequestError) as refused:
        await client.completions.create(model="fake-model", prompt="a b", max_tokens=0)
    body = refused.value.body
    assert isinstance(body, dict) and body["param"] == "max_tokens", body
    assert "or 0 with echo" in body["message"], body


async def test_a_list_of_more_prompts_than_a_key_may_run_at_once_is_refused_whole(keyed: Front) -> None:
    """Admitted one by one, the 17th of 17 prompts met the key's concurrency quota (16) every
    time: the first 16 ran and were canceled at each retry, and the 429 never said why."""
    auth = {"Authorization": f"Bearer {KEY_A}"}
    body: dict[str, Any] = {"model": "fake-model", "prompt": [f"p{i}" for i in range(17)], "max_tokens": 1}
    refused = await keyed.http.post("/v1/completions", json=body, headers=auth)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt", refused.text
    assert "STREAMQ_KEY_MAX_CONCURRENT" in refused.json()["error"]["message"]
    assert refused.json()["error"]["code"] == "limit_exceeded"
    assert not keyed.jobs.jobs
    fits = await keyed.http.post("/v1/completions", json=body | {"prompt": body["prompt"][:16]}, headers=auth)
    assert fits.status_code == 200 and len(fits.json()["choices"]) == 16, fits.text
