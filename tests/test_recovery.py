"""Crash recovery on real processes: a killed or stopped worker's job goes on elsewhere, whole."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import pytest
from rq.job import Job
from rq.registry import StartedJobRegistry

from harness.services import wait_for
from shared import keys
from tests.conftest import LONG_TOKENS, Stack
from tests.reference_answers import greedy_answer
from tests.sse import SSE, follow, text_of
from tests.stack_jobs import running_on, start_workers

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("retire_extra_workers")]


def run_and_read(stack: Stack, model: str, prompt: str) -> tuple[dict[str, Any], list[SSE], threading.Thread]:
    """Submit a long greedy job and read its stream on one connection, in a thread."""
    client = httpx.Client(timeout=120)
    job = client.post(
        f"{stack.url}/v1/jobs",
        json={"prompt": prompt, "model": model, "max_tokens": LONG_TOKENS, "temperature": 0},
    ).json()
    events: list[SSE] = []
    reader = threading.Thread(target=lambda: events.extend(follow(client, stack.url2, job["id"])))
    reader.start()
    return job, events, reader


def check_rq_has_no_ghost(stack: Stack, job_id: str, model: str) -> None:
    r = stack.redis.client()
    assert Job.fetch(job_id, connection=r).get_status() == "finished"
    registry = StartedJobRegistry(keys.queue_name(model), connection=r)
    assert not [e for e in registry.get_job_ids() if e.startswith(job_id)]
    assert r.zscore(keys.RUNNING, job_id) is None


def test_a_killed_workers_job_continues_on_another_and_the_stream_stays_whole(
    stack: Stack, tiny_backend: Any, long_prompts: list[str]
) -> None:
    model = "recover-kill"
    workers = start_workers(stack, model, "--slots", "2")
    prompt = long_prompts[0]
    job, events, reader = run_and_read(stack, model, prompt)
    slot = running_on(stack, job["id"], 100)
    victim = next(w for w in workers if slot == w.name)
    victim.proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()

    def moved() -> bool:
        view = httpx.get(f"{stack.url}/v1/jobs/{job['id']}").json()
        return view["status"] != "queued" and view["worker"] != victim.name

    wait_for(moved, 30, "the job to run again")
    assert time.monotonic() - killed_at <= 10
    reader.join(timeout=120)
    assert [e.event for e in events].count("started") == 2
    assert events[-1].event == "done"
    assert text_of(events) == greedy_answer(tiny_backend, prompt, LONG_TOKENS)  # no gap, no repeat
    assert events[-1].data["usage"]["completion_tokens"] == LONG_TOKENS
    # Timings: the wait before the first run (not until the second), and the rate of the tokens
    # this run generated (not of those the killed run did too).
    timings = events[-1].data["timings"]
    at = {e.event: int(str(e.id).split("-")[0]) / 1000 for e in reversed(events) if e.id}  # first of each
    second_start = [int(str(e.id).split("-")[0]) / 1000 for e in events if e.event == "started"][1]
    assert abs(timings["queue_seconds"] - (at["started"] - at["queued"])) < 0.5, timings
    assert timings["queue_seconds"] < second_start - at["queued"] - 1.0, timings
    generated = timings["tokens_per_second"] * (
        timings["generation_seconds"] - timings["first_token_seconds"]
    )
    assert 0 < generated <= LONG_TOKENS - 100 + 2, timings
    check_rq_has_no_ghost(stack, job["id"], model)

    def dead_worker_gone() -> bool:
        return httpx.get(f"{stack.url}/readyz").json()["models"].get(model, 0) == 1

    wait_for(dead_worker_gone, 30, "the dead worker to leave the list")


def test_a_stopping_worker_hands_its_job_back_after_the_drain_time(
    stack: Stack, tiny_backend: Any, long_prompts: list[str]
) -> None:
    model = "recover-stop"
    workers = start_workers(stack, model, "--slots", "1", env={"STREAMQ_DRAIN_SECONDS": "0.2"})
    prompt = long_prompts[1]
    job, events, reader = run_and_read(stack, model, prompt)
    slot = running_on(stack, job["id"], 100)
    stopping = next(w for w in workers if slot == w.name)
    stopping.stop(signal.SIGTERM)
    assert stopping.proc.returncode == 0
    reader.join(timeout=120)
    assert events[-1].event == "done"
    assert text_of(events) == greedy_answer(tiny_backend, prompt, LONG_TOKENS)
    check_rq_has_no_ghost(stack, job["id"], model)
    view = httpx.get(f"{stack.url}/v1/jobs/{job['id']}").json()
    assert view["worker"] != stopping.name


def test_a_continued_jobs_timeout_counts_from_its_first_start(stack: Stack) -> None:
    """A job's timeout started again with each run: a 3 s job handed back again and again ran
    on for 23 s, and past its keys' lifetime (set at submit), which expired under it: the job
    vanished mid-answer. Its timeout now counts from its first start."""
    from harness.services import start_synthetic_worker

    model = "recover-timeout"
    env = {**stack.env, "STREAMQ_DRAIN_SECONDS": "0.2", "STREAMQ_LEASE_SECONDS": "2"}
    workers = [start_synthetic_worker(env, stack.logdir, model, f"{model}-{n}", 10) for n in "ab"]
    stack.services.extend(workers)
    wait_for(lambda: httpx.get(f"{stack.url}/readyz").json()["models"].get(model, 0) == 2, 60, "2 workers")
    body = {"model": model, "prompt": "x", "max_tokens": 200, "timeout": 4}
    job_id = httpx.post(f"{stack.url}/v1/jobs", json=body, timeout=30).json()["id"]
    first = running_on(stack, job_id, 20)  # 2 s into its 4
    next(w for w in workers if w.name == first).stop(signal.SIGTERM)  # handed back to the other

    def ended() -> dict[str, Any] | None:
        view = httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()
        return view if view["status"] in ("finished", "failed", "canceled") else None

    wait_for(lambda: ended() is not None, 30, "the job to end")
    view = ended()
    assert view is not None and view["finish_reason"] == "timeout" and view["worker"] != first, view
    assert view["finished_at"] - view["started_at"] < 4 + 1.0, view  # not 4 s after the second start
    assert view["usage"]["completion_tokens"] <= 4 * 10 + 5, view
