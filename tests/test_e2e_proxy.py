"""Streams behind a proxy that cuts a response after SILENCE seconds without a byte (nginx's
``proxy_read_timeout``): each client here fails on such a silence (a read timeout), as it would
behind that proxy. The front ticks every PING seconds; its one synthetic worker runs one job at
a time and writes a token every 2 s, so each job here waits in the queue behind another for
longer than SILENCE, then is silent for longer than SILENCE between its tokens. Without
keep-alives every client here would be cut; the tests check that the conditions held."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
from httpx_sse import connect_sse
from openai import OpenAI

from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_for

pytestmark = pytest.mark.e2e

PING = 0.3  # STREAMQ_PING_INTERVAL
SILENCE = 1.5  # the "proxy's" read timeout
TOKENS_PER_SECOND = 0.5  # a token every 2 s: longer than SILENCE
MODEL = "quiet"
TOKENS = 3


@dataclass
class QuietStack:
    url: str

    def view(self, job_id: str) -> dict[str, Any]:
        view: dict[str, Any] = httpx.get(f"{self.url}/v1/jobs/{job_id}", timeout=10).json()
        return view

    def occupy(self) -> None:
        """Start a 2-token job (2 s) in the worker's only slot: the next job waits for it."""
        body = {"model": MODEL, "prompt": "ahead in the queue", "max_tokens": 2}
        ahead = httpx.post(f"{self.url}/v1/jobs", json=body, timeout=10).json()["id"]
        wait_for(lambda: self.view(ahead)["status"] == "running", 30, "the job ahead to run")

    def check_silences(self, job_id: str) -> str:
        """The finished job's text, after checking that its client met silences past SILENCE:
        a wait in the queue and a gap between tokens."""
        view = self.view(job_id)
        assert view["status"] == "finished", view
        assert view["started_at"] - view["created_at"] > SILENCE, view
        assert view["usage"]["completion_tokens"] == TOKENS  # (TOKENS - 1) gaps of 2 s
        text: str = view["text"]
        assert len(text.split()) == TOKENS
        return text


@pytest.fixture(scope="module")
def quiet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuietStack]:
    redis = RedisServer()
    logdir: Path = tmp_path_factory.mktemp("quiet-logs")
    env = {
        "STREAMQ_REDIS_URL": redis.url,
        "STREAMQ_PING_INTERVAL": str(PING),
        "STREAMQ_POSITION_POLL_INTERVAL": "0.1",
        "STREAMQ_DRAIN_SECONDS": "0",
    }
    services: list[Service] = []
    try:
        services.append(start_synthetic_worker(env, logdir, MODEL, "quiet-worker", TOKENS_PER_SECOND, 1))
        front, url = start_front(env, logdir, "quiet-front")
        services.append(front)

        def served() -> bool:
            models = httpx.get(f"{url}/v1/models", timeout=5).json()["data"]
            return MODEL in [m["id"] for m in models]

        wait_for(served, 60, "the synthetic worker")
        yield QuietStack(url)
    finally:
        for service in services:
            service.stop()
        redis.close()


def test_the_seed_stream_client_gets_the_whole_answer_through_the_proxy(quiet: QuietStack) -> None:
    quiet.occupy()
    # The seed's client, unchanged but for the proxy's timeout: it keeps the last chunk's text.
    response = requests.post(
        f"{quiet.url}/stream",
        json={"prompt": "你好", "history": [], "model": MODEL, "max_tokens": TOKENS},
        stream=True,
        timeout=(5, SILENCE),
    )
    assert response.status_code == 200
    answer = None
    for chunk in response.iter_content(chunk_size=None):
        answer = chunk.decode("utf-8").split("<^>")[-1]
    assert answer == quiet.check_silences(response.headers["X-Streamq-Job-Id"])


def test_job_events_reach_an_httpx_sse_client_through_the_proxy(quiet: QuietStack) -> None:
    quiet.occupy()
    body = {"model": MODEL, "prompt": "hello", "max_tokens": TOKENS}
    with httpx.Client(base_url=quiet.url, timeout=httpx.Timeout(5, read=SILENCE)) as http:
        job_id = http.post("/v1/jobs", json=body).json()["id"]
        with connect_sse(http, "GET", f"/v1/jobs/{job_id}/events") as source:
            events = [(sse.event, json.loads(sse.data), sse.retry) for sse in source.iter_sse()]
    names = [name for name, _, _ in events]
    assert names[0] == "queued" and events[0][2] == 1000
    assert names[names.index("started") :] == ["started"] + ["delta"] * TOKENS + ["done"]
    assert set(names[: names.index("started")]) == {"queued"}
    text = "".join(data["text"] for name, data, _ in events if name == "delta")
    assert text == quiet.check_silences(job_id)


def test_openai_streams_reach_their_clients_through_the_proxy(quiet: QuietStack) -> None:
    quiet.occupy()
    # A number: every read (and the connect) gives up after SILENCE.
    client = OpenAI(base_url=f"{quiet.url}/v1", api_key="unused", timeout=SILENCE, max_retries=0)
    with client.chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=TOKENS, stream=True
    ) as raw:
        job_id = raw.headers["X-Streamq-Job-Id"]
        text = "".join(chunk.choices[0].delta.content or "" for chunk in raw.parse() if chunk.choices)
    assert text == quiet.check_silences(job_id)

    quiet.occupy()
    body = {"model": MODEL, "prompt": "hi", "max_tokens": TOKENS, "stream": True}
    with (
        httpx.Client(base_url=quiet.url, timeout=httpx.Timeout(5, read=SILENCE)) as http,
        connect_sse(http, "POST", "/v1/completions", json=body) as source,
    ):
        job_id = source.response.headers["X-Streamq-Job-Id"]
        data = [sse.data for sse in source.iter_sse()]
    assert data[-1] == "[DONE]"
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-1]) == quiet.check_silences(job_id)
