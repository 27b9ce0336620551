"""A front stopped with SIGTERM (a rolling deploy): its open requests end as the README says,
before uvicorn's grace runs out, and their jobs run on. A request waiting for its whole answer
gets a 503 in the error envelope (with its job's id) and its job is canceled (the client's retry
runs it again), an OpenAI stream an error event, a job API stream its "reconnect with
Last-Event-ID" comment, and the streamed jobs run on; no 500, no traceback."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
import pytest

from harness.services import start_front, wait_for
from tests.conftest import SLOW_TOKENS_PER_SECOND, SlowStack

pytestmark = pytest.mark.e2e

GRACE = 3


def test_a_stopping_front_ends_its_requests_cleanly_and_its_jobs_run_on(slow_stack: SlowStack) -> None:
    env = {**slow_stack.env, "STREAMQ_SHUTDOWN_GRACE": str(GRACE)}
    front, url = start_front(env, slow_stack.logdir, "stopping-front", log_level="info")
    tokens = 30 * SLOW_TOKENS_PER_SECOND  # 30 s: long past the grace
    chat = {
        "model": slow_stack.model,
        "messages": [{"role": "user", "content": "go on"}],
        "max_tokens": tokens,
    }
    results: dict[str, Any] = {}
    client = httpx.Client(base_url=url, headers=slow_stack.headers, timeout=60)

    def whole() -> None:
        results["whole"] = client.post("/v1/chat/completions", json=chat)

    def streamed() -> None:
        with client.stream("POST", "/v1/chat/completions", json=chat | {"stream": True}) as response:
            results["stream_job"] = response.headers["X-Streamq-Job-Id"]
            results["stream"] = list(response.iter_lines())

    job = client.post(
        "/v1/jobs", json={"model": slow_stack.model, "prompt": "go", "max_tokens": tokens}
    ).json()

    def followed() -> None:
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as response:
            results["events"] = list(response.iter_lines())

    readers = [threading.Thread(target=t) for t in (whole, streamed, followed)]
    for reader in readers:
        reader.start()
    wait_for(lambda: "stream_job" in results, 30, "the streams to open")
    time.sleep(1.0)  # every request is waiting on its job's output
    stopped_at = time.monotonic()
    front.proc.send_signal(signal.SIGTERM)
    for reader in readers:
        reader.join(GRACE + 10)
    front.proc.wait(GRACE + 10)
    assert time.monotonic() - stopped_at < GRACE + 2

    whole_answer = results["whole"]
    assert whole_answer.status_code == 503, whole_answer.text
    error = whole_answer.json()["error"]
    assert error["type"] == "stream_interrupted" and "this front is stopping" in error["message"], error
    assert "its job is being canceled: send the request again" in error["message"]
    assert error["code"] == "front_stopping" and whole_answer.headers["Retry-After"] == "1", error
    datas = [line[6:] for line in results["stream"] if line.startswith("data: ")]
    assert datas and "error" in json.loads(datas[-1]), results["stream"]  # an error event ends it
    assert "this front is stopping" in json.loads(datas[-1])["error"]["message"]
    assert ": interrupted, reconnect with Last-Event-ID" in results["events"]

    # The streamed jobs run on, on the other front too (they were not canceled with their
    # requests); the waited one is canceled, as no one can read it now.
    for job_id in (results["stream_job"], job["id"]):
        assert slow_stack.job(job_id)["status"] == "running", job_id
    waited = whole_answer.headers["X-Streamq-Job-Id"]
    wait_for(lambda: slow_stack.job(waited)["status"] == "canceled", 10, "the waited job's cancel")
    log = front.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log, log
    slow_stack.cancel([results["stream_job"], job["id"]])
