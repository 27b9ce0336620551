"""The seed's API (ChatGLM-6B's api.py and its `<^>` stream), driven the way its clients drive it."""

from __future__ import annotations

import itertools
import time
from typing import Any

import httpx
import pytest
import requests

from tests.conftest import Stack
from tests.sse import follow, text_of

pytestmark = pytest.mark.e2e


def seed_stream_client(url: str, prompt: str, history: list[list[str]], **extra: Any) -> str:
    """The seed's streaming client: split each chunk on <^> and keep the last part."""
    response = requests.post(
        f"{url}/stream", json={"prompt": prompt, "history": history, **extra}, stream=True
    )
    answer = ""
    for chunk in response.iter_content(chunk_size=None):
        if chunk:
            answer = chunk.decode("utf-8").split("<^>")[-1]
    return answer


def test_post_root_answers_like_chatglm_api(stack: Stack) -> None:
    body: dict[str, Any] = {
        "prompt": "你好",
        "history": [["hi", "hello"]],
        "max_length": 80,
        "top_p": 0.7,
        "temperature": 0.0,
    }
    response = requests.post(f"{stack.url}/", json=body)
    assert response.status_code == 200
    reply = response.json()
    assert set(reply) == {"response", "history", "status", "time"}
    assert reply["status"] == 200
    assert reply["history"] == [["hi", "hello"], ["你好", reply["response"]]]
    assert time.strptime(reply["time"], "%Y-%m-%d %H:%M:%S")
    job_id = response.headers["X-Streamq-Job-Id"]
    assert httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["text"] == reply["response"]
    # The same greedy request answers the same again.
    assert requests.post(f"{stack.url}/", json=body).json()["response"] == reply["response"]


def test_stream_chunks_carry_the_whole_answer_so_far(stack: Stack) -> None:
    body = {"prompt": "stream please", "history": [], "max_length": 200, "temperature": 0.0}
    chunks: list[str] = []
    with httpx.stream("POST", f"{stack.url}/stream", json=body, timeout=30) as response:
        assert response.status_code == 200
        job_id = response.headers["X-Streamq-Job-Id"]
        for chunk in response.iter_text():
            chunks.extend(part for part in chunk.split("<^>") if part)
    answer = httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["text"]
    assert len(chunks) >= 2 and chunks[-1] == answer
    assert all(later.startswith(earlier) for earlier, later in itertools.pairwise(chunks))
    assert seed_stream_client(stack.url, "stream please", [], max_length=200, temperature=0.0) == answer


def test_seed_errors_are_json_with_a_4xx(stack: Stack) -> None:
    missing = requests.post(f"{stack.url}/", json={"history": []})
    assert missing.status_code == 400 and "prompt" in missing.json()["error"]["message"]
    too_short = requests.post(
        f"{stack.url}/stream", json={"prompt": "several words of prompt", "max_length": 2}
    )
    assert too_short.status_code == 400
    assert "max_length (2) must be greater" in too_short.json()["error"]["message"]
    bad_p = requests.post(f"{stack.url}/", json={"prompt": "x", "top_p": 2})
    assert bad_p.status_code == 400 and bad_p.json()["error"]["param"] == "top_p"
    # A prompt over the model's context, and no max_length sent: the prompt's fault (OpenAI's
    # words and code), not the max_length of 2048 this API takes when none is sent.
    for path in ("/", "/stream"):
        huge = requests.post(f"{stack.url}{path}", json={"prompt": "Redis streams " * 3000})
        error = huge.json()["error"]
        assert huge.status_code == 400 and (error["param"], error["code"]) == (
            "prompt",
            "context_length_exceeded",
        ), error
        assert error["message"].startswith(
            "This model's maximum context length is 4096 tokens. However, the prompt resulted in "
        ), error


def _job_id_of_prompt(stack: Stack, prompt: str) -> str:
    r = stack.redis.client(decode_responses=True)
    for key in r.scan_iter("streamq:job:*"):
        if prompt in (r.hget(key, "request") or ""):
            return key.split("{")[1].rstrip("}")
    raise AssertionError(f"no job for {prompt!r}")


@pytest.mark.parametrize("path", ["/", "/stream"])
def test_a_client_that_goes_away_cancels_its_job(stack: Stack, path: str) -> None:
    prompt = f"a long answer that nobody waits for via {path}"
    body = {"prompt": prompt, "max_length": 3000, "temperature": 0.0}
    if path == "/stream":
        with (
            httpx.Client(timeout=30) as client,
            client.stream("POST", f"{stack.url}{path}", json=body) as response,
        ):
            next(response.iter_text())  # output has begun; then the client hangs up
    else:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up waiting and hangs up
            httpx.post(f"{stack.url}{path}", json=body, timeout=httpx.Timeout(10, read=0.5))
    job_id = _job_id_of_prompt(stack, prompt)
    deadline = time.monotonic() + 10
    while (view := httpx.get(f"{stack.url}/v1/jobs/{job_id}").json())["status"] not in (
        "canceled",
        "finished",
    ):
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert view["status"] == "canceled"
    assert view["usage"]["completion_tokens"] < 2900
    assert follow(httpx.Client(), stack.url, job_id)[-1].event == "canceled"
    assert text_of(follow(httpx.Client(), stack.url, job_id)) == view["text"]
