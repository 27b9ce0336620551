"""Requests that need what only some engines do (penalties, logit bias, structured output,
logprobs, raw prompts, tools): a 400 naming the field where the serving engine cannot do it,
never a silent ignore. The synthetic engine (like ChatGLM's stream_chat) offers none of them;
tests/test_openai_fidelity.py and tests/test_vllm_engine.py check that the transformers and vLLM
engines honour each."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from shared.schemas import ChatMessage, GenerationRequest
from tests.conftest import SlowStack, Stack
from worker.engine import Engine, EngineJob, JobOutput
from worker.synthetic import SyntheticBackend, SyntheticModel

pytestmark = pytest.mark.e2e

SCHEMA = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
NEEDS_FEATURE = [
    ({"presence_penalty": 0.5}, "presence_penalty"),
    ({"frequency_penalty": -1.0}, "frequency_penalty"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"logit_bias": {"7": 5}}, "logit_bias"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}},
        "response_format",
    ),
    ({"logprobs": 2}, "logprobs"),
    ({"prompt_logprobs": 0}, "prompt_logprobs"),
    ({"tools": [TOOL], "messages": [{"role": "user", "content": "hi"}], "prompt": None}, "tools"),
]


def jobs_in_redis(redis: Any) -> int:
    return len(redis.client().keys("streamq:job:*"))


@pytest.mark.parametrize(("fields", "param"), NEEDS_FEATURE)
def test_a_field_the_engine_cannot_honour_is_a_400_that_names_it(
    slow_stack: SlowStack, fields: dict[str, Any], param: str
) -> None:
    before = jobs_in_redis(slow_stack.redis)
    body = {"model": slow_stack.model, "prompt": "hi", "max_tokens": 4, **fields}
    response = httpx.post(
        f"{slow_stack.url}/v1/jobs",
        json={k: v for k, v in body.items() if v is not None},
        headers=slow_stack.headers,
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["code"] == "unsupported_parameter"
    assert "synthetic engine" in error["message"] and "not supported" in error["message"]
    assert jobs_in_redis(slow_stack.redis) == before  # refused before any job exists


def test_the_openai_sdk_gets_a_bad_request_naming_the_field_as_it_sent_it(slow_stack: SlowStack) -> None:
    with openai.OpenAI(
        base_url=slow_stack.url + "/v1", api_key=slow_stack.api_key, max_retries=0, timeout=60
    ) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            client.completions.create(model=slow_stack.model, prompt="hi", echo=True, logprobs=1)
        assert caught.value.body["param"] == "logprobs"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=slow_stack.model,
                messages=[{"role": "user", "content": "hi"}],
                logprobs=True,
            )
        assert caught.value.body["param"] == "logprobs"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=slow_stack.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                presence_penalty=0.6,
            )
        assert caught.value.body["param"] == "presence_penalty"  # type: ignore[index]
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(
                model=slow_stack.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=4,
                response_format={"type": "json_object"},
            )
        assert caught.value.body["param"] == "response_format"  # type: ignore[index]


def test_the_synthetic_engine_ends_an_answer_at_a_stop_sequence(slow_stack: SlowStack) -> None:
    """It took ``stop`` and went on past it (a fuzzer's find): it ends there, as a model does,
    a stop sequence across two of its tokens too (the text before it held back meanwhile)."""
    with openai.OpenAI(
        base_url=slow_stack.url + "/v1", api_key=slow_stack.api_key, max_retries=0, timeout=60
    ) as client:
        for stop, said in (("amet", "ipsum dolor sit "), ("sit am", "ipsum dolor ")):
            answer = client.chat.completions.create(
                model=slow_stack.model, messages=[{"role": "user", "content": "hi"}], max_tokens=20, stop=stop
            )
            choice = answer.choices[0]
            assert (choice.message.content, choice.finish_reason) == (said, "stop"), stop
        plain = client.chat.completions.create(
            model=slow_stack.model, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stop="nowhere"
        )
        assert plain.choices[0].message.content == "ipsum dolor sit amet consectetur "
        assert plain.choices[0].finish_reason == "length"


def finished_job(stack: Stack, job_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = httpx.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json()
        if view["status"] not in ("queued", "running"):
            return dict(view)
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} did not end")


@pytest.mark.parametrize(("fields", "param"), NEEDS_FEATURE)
def test_the_transformers_engine_honours_each_field(stack: Stack, fields: dict[str, Any], param: str) -> None:
    body = {"model": stack.model_dir.name, "prompt": "hi", "max_tokens": 60, **fields}
    response = httpx.post(f"{stack.url}/v1/jobs", json={k: v for k, v in body.items() if v is not None})
    assert response.status_code == 202, response.text
    view = finished_job(stack, response.json()["id"])
    assert view["status"] == "finished" and view["error"] is None, view
    if "response_format" in fields and view["finish_reason"] == "stop":
        assert isinstance(json.loads(view["text"]), dict)


def test_the_openai_sdk_gets_a_json_answer_from_the_transformers_engine(stack: Stack) -> None:
    schema: dict[str, object] = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
    }
    with openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0, timeout=60) as client:
        completion = client.chat.completions.create(
            model=stack.model_dir.name,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=20,
            presence_penalty=0.6,
            response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}},
        )
    answer = completion.choices[0]
    assert answer.finish_reason == "stop"
    assert json.loads(answer.message.content or "") in ({"ok": True}, {"ok": False})


@pytest.mark.parametrize(
    "fields",
    [
        {"presence_penalty": 0, "frequency_penalty": 0.0, "repetition_penalty": 1},
        {"logit_bias": {}},
        {"response_format": {"type": "text"}},
    ],
)
def test_neutral_values_ask_for_nothing_and_run_anywhere(stack: Stack, fields: dict[str, Any]) -> None:
    response = httpx.post(
        f"{stack.url}/v1/jobs",
        json={"model": stack.model_dir.name, "prompt": "hi", "max_tokens": 4, **fields},
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("fields", "param", "words"),
    [
        ({"logit_bias": {"x": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "-100 to 100"),
        ({"presence_penalty": 3}, "presence_penalty", "less than or equal to 2"),
        ({"repetition_penalty": 0}, "repetition_penalty", "greater than or equal to 0.01"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_object"),
    ],
)
def test_bad_values_are_400s_that_say_what_is_wrong(
    stack: Stack, fields: dict[str, Any], param: str, words: str
) -> None:
    response = httpx.post(
        f"{stack.url}/v1/jobs", json={"model": stack.model_dir.name, "prompt": "hi", **fields}
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


class _Outputs:
    def __init__(self) -> None:
        self.items: list[JobOutput] = []
        self.ended = threading.Event()

    def put(self, outputs: list[JobOutput]) -> None:
        self.items += outputs
        if any(o.finish_reason for o in outputs):
            self.ended.set()


@pytest.fixture
def synthetic_engine() -> Iterator[tuple[Engine, _Outputs]]:
    outputs = _Outputs()
    engine = Engine(SyntheticModel(SyntheticBackend("synth", 1000), 4), outputs)
    engine.start()
    yield engine, outputs
    engine.stop()


def test_a_worker_refuses_a_job_that_reached_it_needing_what_its_engine_lacks(
    synthetic_engine: tuple[Engine, _Outputs],
) -> None:
    """No live worker to ask at submit (scale to zero): the worker's engine refuses it, naming it."""
    engine, outputs = synthetic_engine
    request = GenerationRequest(
        messages=[ChatMessage(role="user", content="hi")],
        max_tokens=4,
        temperature=0,
        top_p=1,
        json_object=True,
    )
    now = time.time()
    engine.submit(EngineJob("needs-json", request, now, now, time.monotonic() + 60))
    assert outputs.ended.wait(10)
    (end,) = [o for o in outputs.items if o.finish_reason]
    assert end.finish_reason == "error" and end.error_type == "invalid_request_error"
    assert "'response_format' is not supported by this model's synthetic engine" in end.error_message
