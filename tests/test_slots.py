"""A worker process with K slots, end to end: one dispatcher takes jobs for K slots around one engine."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.worker import Worker

from harness.services import Service, wait_for
from shared import keys
from shared.schemas import ChatMessage, GenerationRequest
from tests.conftest import Stack
from tests.sse import follow, text_of
from worker.synthetic import WORDS

pytestmark = pytest.mark.e2e


def start_worker(stack: Stack, name: str, *args: str) -> Service:
    service = Service(["worker", "--name", name, *args], stack.env, name, stack.logdir)
    stack.services.append(service)
    return service


def serving(stack: Stack, model: str, count: int = 1) -> None:
    def ready() -> bool:
        return httpx.get(f"{stack.url}/readyz").json()["models"].get(model, 0) >= count

    wait_for(ready, 90, f"a worker serving {model}")


def greedy(backend: Any, prompt: str, max_tokens: int) -> str:
    req = GenerationRequest(
        messages=[ChatMessage(role="user", content=prompt)], max_tokens=max_tokens, temperature=0.0, top_p=1.0
    )
    return "".join(step.delta for step in backend.generate(req))


def test_k_slots_run_at_most_k_jobs_at_once_and_all_finish_as_alone(
    stack: Stack, tiny_backend: Any, long_prompts: list[str]
) -> None:
    slots = 3
    worker = start_worker(
        stack, "slotted-3", "--model", str(stack.model_dir), "--served-name", "slotted", "--slots", str(slots)
    )
    serving(stack, "slotted")
    r = stack.redis.client(decode_responses=True)
    prompts = [long_prompts[i % 3] if i % 2 else f"short question {i}" for i in range(3 * slots)]
    with httpx.Client(timeout=60) as client:
        jobs = [
            client.post(
                f"{stack.url}/v1/jobs",
                json={"prompt": p, "model": "slotted", "max_tokens": 300, "temperature": 0},
            ).json()
            for p in prompts
        ]
        started = StartedJobRegistry(keys.queue_name("slotted"), connection=stack.redis.client())
        most_running, most_started, states = 0, 0, set()
        while True:
            statuses = [r.hget(keys.job(j["id"]), "status") for j in jobs]
            most_running = max(most_running, statuses.count("running"))
            most_started = max(most_started, len(started.get_job_ids()))
            rq_workers = [
                w for w in Worker.all(connection=stack.redis.client()) if w.name.startswith("slotted-3")
            ]
            states |= {w.get_state() for w in rq_workers}
            if all(s in ("finished", "failed", "canceled") for s in statuses):
                break
            time.sleep(0.005)
        assert [w.name for w in rq_workers] == ["slotted-3"]  # the process is one worker in `rq info`
        assert most_running == slots and most_started == slots  # RQ's started registry: K runs at most
        assert "busy" in states
        with ThreadPoolExecutor(4) as pool:
            streams = list(pool.map(lambda j: follow(client, stack.url2, j["id"]), jobs))
    for prompt, events in zip(prompts, streams, strict=True):
        assert events[-1].event == "done"
        assert text_of(events) == greedy(tiny_backend, prompt, 300)
    worker.stop()
    assert worker.proc.returncode == 0
    assert not [w for w in Worker.all(connection=stack.redis.client()) if w.name.startswith("slotted-3")]


def test_the_synthetic_backend_streams_paced_tokens_without_a_model(stack: Stack) -> None:
    worker = start_worker(
        stack, "synthetic-1", "--backend", "synthetic", "--tokens-per-second", "50", "--slots", "4"
    )
    serving(stack, "synthetic")
    with httpx.Client(timeout=60) as client:
        started = time.monotonic()
        job = client.post(
            f"{stack.url}/v1/jobs", json={"prompt": "load test", "model": "synthetic", "max_tokens": 20}
        ).json()
        events = follow(client, stack.url, job["id"])
        took = time.monotonic() - started
    assert events[-1].event == "done"
    assert events[-1].data["usage"]["completion_tokens"] == 20
    assert len(text_of(events).split()) == 20
    assert took >= 19 / 50  # paced: 20 tokens at 50 per second
    worker.stop()


def test_a_job_past_its_own_time_limit_ends_with_finish_reason_timeout(stack: Stack) -> None:
    worker = start_worker(
        stack, "synthetic-2", "--backend", "synthetic", "--tokens-per-second", "20", "--served-name", "slow"
    )
    serving(stack, "slow")
    with httpx.Client(timeout=60) as client:
        body = {"prompt": "go on", "model": "slow", "max_tokens": 200, "timeout": 1}
        job = client.post(f"{stack.url}/v1/jobs", json=body).json()
        events = follow(client, stack.url, job["id"])
        view = client.get(f"{stack.url}/v1/jobs/{job['id']}").json()
    assert events[-1].event == "done" and events[-1].data["finish_reason"] == "timeout"
    assert view["status"] == "finished" and view["finish_reason"] == "timeout"
    assert 5 < view["usage"]["completion_tokens"] < 200 and view["text"]  # what it made in time is kept
    worker.stop()


def test_a_job_that_waited_past_its_queue_ttl_fails_as_expired_in_streamq_and_rq(stack: Stack) -> None:
    worker = start_worker(
        stack,
        "synthetic-3",
        "--backend",
        "synthetic",
        "--tokens-per-second",
        "20",
        "--slots",
        "1",
        "--served-name",
        "busy",
    )
    serving(stack, "busy")
    with httpx.Client(timeout=60) as client:
        first = client.post(f"{stack.url}/v1/jobs", json={"prompt": "a", "model": "busy", "max_tokens": 50})
        late = client.post(
            f"{stack.url}/v1/jobs", json={"prompt": "b", "model": "busy", "max_tokens": 5, "queue_ttl": 1}
        ).json()
        events = follow(client, stack.url, late["id"])
        view = client.get(f"{stack.url}/v1/jobs/{late['id']}").json()
        assert follow(client, stack.url, first.json()["id"])[-1].event == "done"
    assert events[-1].event == "error" and events[-1].data["type"] == "expired"
    assert view["status"] == "failed" and view["error"]["type"] == "expired"
    wait_for(
        lambda: Job.fetch(late["id"], connection=stack.redis.client()).get_status() == "failed", 10, "RQ"
    )
    worker.stop()


def test_a_job_handed_back_after_its_queue_ttl_is_continued_not_expired(stack: Stack) -> None:
    """queue_ttl bounds a job's wait for its first start only: a job a stopping worker hands back
    (its attempt given back) after running longer than that is continued by the next worker,
    whole, not failed as "expired" mid-answer."""
    env = {**stack.env, "STREAMQ_DRAIN_SECONDS": "0"}
    args = ["worker", "--backend", "synthetic", "--tokens-per-second", "10", "--served-name", "handed"]
    first = Service([*args, "--name", "handed-a"], env, "handed-a", stack.logdir)
    stack.services.append(first)
    serving(stack, "handed")
    tokens = 40
    with httpx.Client(timeout=60) as client:
        body = {"prompt": "a", "model": "handed", "max_tokens": tokens, "queue_ttl": 1}
        job_id = client.post(f"{stack.url}/v1/jobs", json=body).json()["id"]
        wait_for(
            lambda: client.get(f"{stack.url}/v1/jobs/{job_id}").json()["usage"]["completion_tokens"] >= 15,
            20,
            "1.5 s of output: past the job's queue_ttl",
        )
        first.stop()  # SIGTERM, no drain time: the job goes back to its queue
        assert client.get(f"{stack.url}/v1/jobs/{job_id}").json()["status"] == "queued"
        second = Service([*args, "--name", "handed-b"], env, "handed-b", stack.logdir)
        stack.services.append(second)
        events = follow(client, stack.url, job_id)
    assert events[-1].event == "done", events[-1]
    assert text_of(events) == "".join(WORDS[n % len(WORDS)] + " " for n in range(1, tokens + 1))
    second.stop()
