"""The job API end to end: real fronts (uvicorn), real workers with the tiny model, real Redis."""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from harness.services import start_front
from tests.conftest import LONG_TOKENS, STACK_CAPACITY, Stack
from tests.reference_answers import greedy_answer
from tests.sse import SSE, follow, read_events, text_of
from tests.stack_jobs import job_records, submit

pytestmark = pytest.mark.e2e


def test_submit_stream_and_poll(stack: Stack, tiny_backend: Any) -> None:
    with httpx.Client(timeout=30) as client:
        job = submit(
            client,
            stack.url,
            messages=[{"role": "user", "content": "What is a queue?"}],
            max_tokens=40,
            temperature=0,
        )
        assert job["status"] in ("queued", "running") and len(job["id"]) == 32
        events = follow(client, stack.url, job["id"])
        names = [e.event for e in events]
        assert names[0] == "queued" and names[-1] == "done"
        assert "started" in names and "delta" in names
        assert all(e.id for e in events)  # every stored event carries its stream entry id
        done = events[-1].data
        assert done["finish_reason"] in ("stop", "length")
        assert done["usage"]["completion_tokens"] > 0 and done["usage"]["prompt_tokens"] > 0
        assert set(done["timings"]) >= {"queue_seconds", "first_token_seconds", "generation_seconds"}

        view = client.get(f"{stack.url}/v1/jobs/{job['id']}").json()
        assert view["status"] == "finished"
        assert view["text"] == text_of(events) == greedy_answer(tiny_backend, "What is a queue?", 40)
        assert view["usage"] == done["usage"]
        assert view["worker"] in ("worker-1", "worker-2")
        assert view["created_at"] <= view["started_at"] <= view["finished_at"]

        # Tokens are coalesced: at most one delta per publish interval (40 ms), plus the first.
        deltas = sum(e.event == "delta" for e in events)
        assert deltas <= done["timings"]["generation_seconds"] / 0.04 + 2
        # Every key of a finished job expires after the result TTL (3600 s by default).
        r = stack.redis.client()
        for key in (
            f"streamq:job:{{{job['id']}}}",
            f"streamq:events:{{{job['id']}}}",
            f"streamq:text:{{{job['id']}}}",
        ):
            assert 0 < r.ttl(key) <= 3600
        assert r.xinfo_stream(f"streamq:events:{{{job['id']}}}")["length"] == len(events)


def test_sse_headers_and_resume_from_another_front(stack: Stack) -> None:
    with httpx.Client(timeout=30) as client:
        job = submit(client, stack.url, prompt="resume me", max_tokens=60, temperature=0)
        everything = follow(client, stack.url, job["id"])
        assert len(everything) >= 4
        cut = len(everything) // 2
        # A client that saw the first half re-attaches to the other front process.
        rest = follow(client, stack.url2, job["id"], last_event_id=everything[cut - 1].id)
        assert [(e.id, e.event, e.data) for e in rest] == [(e.id, e.event, e.data) for e in everything[cut:]]
        assert text_of(everything[:cut]) + text_of(rest) == text_of(everything)
        with client.stream("GET", f"{stack.url2}/v1/jobs/{job['id']}/events") as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"


def test_twenty_concurrent_jobs_each_get_their_own_answer(stack: Stack, tiny_backend: Any) -> None:
    prompts = [f"question number {i}: tell me something" for i in range(20)]
    expected = {p: greedy_answer(tiny_backend, p, 24) for p in prompts}
    assert len(set(expected.values())) > 10  # the prompts do lead to different answers

    def one(prompt: str) -> tuple[str, str, str]:
        with httpx.Client(timeout=60) as client:
            url = stack.url if hash(prompt) % 2 else stack.url2
            job = submit(client, url, prompt=prompt, max_tokens=24, temperature=0)
            events = follow(client, url, job["id"])
            view = client.get(f"{url}/v1/jobs/{job['id']}").json()
            return text_of(events), view["text"], view["worker"]

    with ThreadPoolExecutor(max_workers=20) as pool:
        results = dict(zip(prompts, pool.map(one, prompts), strict=True))
    for prompt, (streamed, stored, _) in results.items():
        assert streamed == stored == expected[prompt], prompt
    assert {worker for _, _, worker in results.values()} == {"worker-1", "worker-2"}


def cancel_all(client: httpx.Client, url: str, jobs: list[dict[str, Any]]) -> None:
    for job in jobs:
        client.post(f"{url}/v1/jobs/{job['id']}/cancel")


def test_queue_position_goes_down_while_waiting(stack: Stack, long_prompts: list[str]) -> None:
    with httpx.Client(timeout=60) as client:
        # Keep every slot of both workers busy with jobs of different lengths (so that they end
        # one after another, not together), then queue three more behind them.
        lengths = [LONG_TOKENS - 350 * i for i in range(STACK_CAPACITY)] + [LONG_TOKENS] * 3
        jobs = [
            submit(client, stack.url, prompt=long_prompts[i % 3], max_tokens=n, temperature=0)
            for i, n in enumerate(lengths)
        ]
        last = jobs[-1]
        assert last["position"] is not None and last["position"] >= 1
        positions: list[int] = []
        queued_events: list[int] = []

        def watch_events() -> None:
            for event in follow(client, stack.url2, last["id"]):
                if event.event == "queued" and event.data.get("position") is not None:
                    queued_events.append(event.data["position"])

        watcher = threading.Thread(target=watch_events)
        watcher.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            view = client.get(f"{stack.url}/v1/jobs/{last['id']}").json()
            if view["status"] != "queued":
                break
            positions.append(view["position"])
            time.sleep(0.02)
        watcher.join(timeout=60)
        assert len(set(positions)) >= 2, positions
        assert positions == sorted(positions, reverse=True)
        assert len(queued_events) >= 2 and queued_events == sorted(queued_events, reverse=True)
        cancel_all(client, stack.url, jobs)


def test_a_waiting_stream_gets_keep_alive_pings(stack: Stack, long_prompts: list[str]) -> None:
    with httpx.Client(timeout=60) as client:
        jobs = [
            submit(client, stack.url, prompt=long_prompts[i % 3], max_tokens=LONG_TOKENS, temperature=0)
            for i in range(STACK_CAPACITY + 2)
        ]
        waiting = submit(client, stack.url, prompt="wait", max_tokens=4)  # two places behind busy slots
        pings = 0
        with client.stream("GET", f"{stack.url}/v1/jobs/{waiting['id']}/events") as response:
            for line in response.iter_lines():
                pings += line == ": ping"  # STREAMQ_PING_INTERVAL is 0.5 s in this stack
                if pings == 1 or line == "event: started":
                    break
        cancel_all(client, stack.url, [*jobs, waiting])
        assert pings == 1


def test_cancel_a_queued_and_a_running_job(stack: Stack, long_prompts: list[str]) -> None:
    r = stack.redis.client()
    with httpx.Client(timeout=60) as client:
        busy = [
            submit(client, stack.url, prompt=long_prompts[i % 3], max_tokens=LONG_TOKENS, temperature=0)
            for i in range(STACK_CAPACITY)
        ]
        queued = submit(client, stack.url, prompt="never runs", max_tokens=10)
        assert queued["status"] == "queued"
        canceled = client.post(f"{stack.url}/v1/jobs/{queued['id']}/cancel")
        assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
        assert [e.event for e in follow(client, stack.url, queued["id"])] == ["queued", "canceled"]
        assert r.hget(f"rq:job:{queued['id']}", "status") == b"canceled"

        running = busy[0]
        while client.get(f"{stack.url}/v1/jobs/{running['id']}").json()["status"] == "queued":
            time.sleep(0.01)
        stopped = client.post(f"{stack.url2}/v1/jobs/{running['id']}/cancel").json()
        assert stopped["status"] == "canceled" and stopped["finish_reason"] == "canceled"
        assert stopped["usage"]["completion_tokens"] < LONG_TOKENS
        events = follow(client, stack.url, running["id"])
        assert events[-1].event == "canceled" and [e.event for e in events].count("canceled") == 1
        time.sleep(0.5)  # a canceled job stays canceled: nothing overwrites it later
        assert client.get(f"{stack.url}/v1/jobs/{running['id']}").json()["status"] == "canceled"
        assert r.hget(f"rq:job:{running['id']}", "status") == b"canceled"

        again = client.post(f"{stack.url}/v1/jobs/{running['id']}/cancel")
        assert again.status_code == 409
        assert again.json()["error"]["code"] == "job_already_ended"
        assert again.json()["job"]["status"] == "canceled"
        assert client.delete(f"{stack.url}/v1/jobs/{busy[1]['id']}").json()["status"] == "canceled"
        cancel_all(client, stack.url, busy[2:])


@pytest.mark.parametrize(
    ("body", "status", "param", "says"),
    [
        ({"max_tokens": 5}, 400, "messages", "'messages' or 'prompt' (or 'raw_prompt') is required"),
        ({"prompt": "x", "temperature": -1}, 400, "temperature", "greater than or equal to 0"),
        ({"prompt": "x", "top_p": -0.5}, 400, "top_p", "greater than or equal to 0"),
        ({"prompt": "x", "top_p": 1.01}, 400, "top_p", "less than or equal to 1"),
        ({"prompt": "x", "max_tokens": 10**6}, 400, "max_tokens", "at most"),
        ({"prompt": "x", "timeout": 10**6}, 400, "timeout", "at most 1800 seconds"),
        ({"prompt": "x", "queue_ttl": 0}, 400, "queue_ttl", "greater than or equal to 1"),
        ({"prompt": "x", "model": "no-such-model"}, 404, "model", "not served"),
        ({"messages": "hello"}, 400, "messages", "valid list"),
        ({"prompt": "\ud800"}, 400, "prompt", "valid Unicode"),
        ({"messages": [{"role": "user", "content": "a\udfffb"}]}, 400, "messages.0.content", "valid Unicode"),
        ({"prompt": "x", "model": "\ud800"}, 400, "model", "valid Unicode"),
        (  # anywhere in the body, a JSON Schema's keys included
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"\udc00": 1}}}],
            },
            400,
            "tools.0.function.parameters",
            "a key in 'tools.0.function.parameters' is not valid Unicode",
        ),
        ({"prompt": "x", "max_tokens": "5"}, 400, "max_tokens", "valid integer"),
        ({"prompt": "x", "max_tokens": True}, 400, "max_tokens", "valid integer"),
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature", "valid number"),
    ],
)
def test_bad_job_requests_get_a_clear_4xx(
    stack: Stack, body: dict[str, Any], status: int, param: str | None, says: str
) -> None:
    before = job_records(stack)
    # json.dumps escapes as ASCII, so lone surrogates travel as the \\uXXXX escapes a client sends.
    headers = {"Content-Type": "application/json"}
    response = httpx.post(f"{stack.url}/v1/jobs", content=json.dumps(body), headers=headers)
    assert response.status_code == status
    error = response.json()["error"]
    assert says in error["message"]
    assert error["param"] == param
    assert error["type"] in ("invalid_request_error", "not_found_error")
    assert job_records(stack) - before == set()  # no half-created job


def test_malformed_json_unknown_job_and_bad_event_id(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.url}/v1/jobs", content=b'{"prompt": "x",', headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    empty = httpx.post(f"{stack.url}/v1/jobs", headers={"Content-Type": "application/json"})
    assert empty.status_code == 400 and "body is missing" in empty.json()["error"]["message"]
    for path in ("/v1/jobs/0123456789abcdef0123456789abcdef", "/v1/jobs/nope", "/v1/jobs/nope/events"):
        missing = httpx.get(f"{stack.url}{path}")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "job_not_found"
    assert httpx.post(f"{stack.url}/v1/jobs/0123456789abcdef0123456789abcdef/cancel").status_code == 404
    job = httpx.post(f"{stack.url}/v1/jobs", json={"prompt": "x", "max_tokens": 2}).json()
    for bad_id in ("yesterday", "99999999999999999999999", "1-18446744073709551616"):
        bad = httpx.get(f"{stack.url}/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": bad_id})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "Last-Event-ID"


def test_resuming_after_the_final_event_ends_at_once(stack: Stack, long_prompts: list[str]) -> None:
    with httpx.Client(timeout=30) as client:
        job = submit(client, stack.url, prompt="short", max_tokens=5)
        events = follow(client, stack.url, job["id"])
        last_id = events[-1].id
        assert last_id is not None
        after_end = client.get(f"{stack.url2}/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": last_id})
        assert after_end.status_code == 204  # EventSource stops reconnecting on 204
        running = submit(client, stack.url, prompt=long_prompts[0], max_tokens=LONG_TOKENS, temperature=0)
        future = client.get(
            f"{stack.url}/v1/jobs/{running['id']}/events", headers={"Last-Event-ID": "99999999999999-0"}
        )
        assert future.status_code == 400 and "not an event of this job" in future.json()["error"]["message"]
        # An id between two of the job's events (one a crashed Redis lost, another job's) is none
        # of its events either; 0-0 is the stream's start.
        assert events[1].id is not None
        ms, seq = events[1].id.split("-")
        between = f"{ms}-{int(seq) + 1000}"
        lost = client.get(f"{stack.url}/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": between})
        assert lost.status_code == 400 and "not an event" in lost.json()["error"]["message"], between
        whole = client.get(f"{stack.url}/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "0-0"})
        assert whole.status_code == 200 and whole.text.count("event: delta") > 0
        cancel_all(client, stack.url, [running])


def test_not_ready_while_an_expected_model_has_no_worker(stack: Stack) -> None:
    front, url = start_front(
        {**stack.env, "STREAMQ_MODELS": "streamq-tiny,absent-model"}, stack.logdir, "front-3"
    )
    try:
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["models"] == {"streamq-tiny": 2, "absent-model": 0}
        assert ready.json()["redis"] is True and ready.json()["ready"] is False
    finally:
        front.stop()


def test_readiness_and_health(stack: Stack) -> None:
    assert httpx.get(f"{stack.url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{stack.url}/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["redis"] is True
    assert body["models"]["streamq-tiny"] == 2


def test_dropped_redis_connections_are_reopened_without_failing_anyone(
    stack: Stack, long_prompts: list[str]
) -> None:
    r = stack.redis.client(decode_responses=True)
    with httpx.Client(timeout=30) as client:
        job = submit(client, stack.url, prompt=long_prompts[1], max_tokens=LONG_TOKENS, temperature=0)
        seen: list[SSE] = []
        with client.stream("GET", f"{stack.url}/v1/jobs/{job['id']}/events") as response:
            for event in read_events(response):
                if event is None:
                    continue
                seen.append(event)
                if event.event == "delta" and len(seen) == 3:
                    for c in r.client_list():  # cut every connection the fronts hold
                        if c.get("name") == "streamq-front":
                            r.client_kill_filter(_id=c["id"])
                    # The very next request on that front still succeeds (its pools reconnect).
                    assert client.get(f"{stack.url}/v1/jobs/{job['id']}").status_code == 200
                if event.event in ("done", "error", "canceled"):
                    break
        assert seen[-1].event == "done"  # the stream went on through the reconnect
        view = client.get(f"{stack.url}/v1/jobs/{job['id']}").json()
        assert text_of(seen) == view["text"]
