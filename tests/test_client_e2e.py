"""The Python client against real fronts: a front restarted mid-stream costs the client nothing
(every event once, the whole answer), sync and async; API errors come back typed."""

from __future__ import annotations

import asyncio
import signal
import threading
from typing import Any

import httpx
import pytest

from streamq import AsyncStreamqClient, Backoff, StreamEvent, StreamqClient, StreamqError
from streamq.processes import Service, start_front
from tests.conftest import LONG_TOKENS, SlowStack, Stack
from tests.processes import restart_front_soon
from tests.test_e2e_jobs import greedy_answer

pytestmark = pytest.mark.e2e

PATIENT = Backoff(initial=0.1, factor=2, cap=1.0, max_attempts=120)  # a front restart takes seconds


def _check_once(events: list[StreamEvent]) -> None:
    ids = [e.id for e in events if e.id is not None]
    assert len(ids) == len(set(ids)), "an event came twice"
    assert sum(e.final for e in events) == 1 and events[-1].final


def test_the_client_resumes_after_its_front_restarts_mid_stream(
    stack: Stack, tiny_backend: Any, long_prompts: list[str]
) -> None:
    front, url = start_front(stack.env, stack.logdir, "front-restarted")
    fronts: list[Service] = [front]
    restart: threading.Thread | None = None
    reconnects: list[tuple[int, float, str]] = []
    events: list[StreamEvent] = []
    prompt = long_prompts[1]
    try:
        with StreamqClient(url, backoff=PATIENT) as client:
            job = client.submit(prompt=prompt, max_tokens=LONG_TOKENS, temperature=0)
            for event in client.events(job.id, on_reconnect=lambda *a: reconnects.append(a)):
                events.append(event)
                if restart is None and sum(e.event == "delta" for e in events) == 3:
                    front.proc.send_signal(signal.SIGKILL)  # mid-answer, no goodbye
                    front.stop()
                    restart = restart_front_soon(stack.env, stack.logdir, "front-restarted-2", url, fronts)
            assert restart is not None
            restart.join()
            view = client.status(job.id)
    finally:
        for service in fronts:
            service.stop()
    assert reconnects, "the stream was never cut: the test did not test a resume"
    _check_once(events)
    assert events[-1].event == "done"
    text = "".join(e.text for e in events)
    assert view.status == "finished"
    assert text == view.text == greedy_answer(tiny_backend, prompt, LONG_TOKENS)


def test_the_async_client_resumes_after_its_front_restarts_while_the_job_runs(slow_stack: SlowStack) -> None:
    tokens = 120  # six seconds of words: the job is still running when the front is back

    async def scenario() -> tuple[list[StreamEvent], list[Any], Any]:
        front, url = await asyncio.to_thread(start_front, slow_stack.env, slow_stack.logdir, "slow-restarted")
        fronts = [front]
        reconnects: list[Any] = []
        events: list[StreamEvent] = []
        restart: threading.Thread | None = None
        try:
            async with AsyncStreamqClient(url, api_key=slow_stack.api_key, backoff=PATIENT) as client:
                question = [{"role": "user", "content": "talk for a while"}]
                job = await client.submit(question, model=slow_stack.model, max_tokens=tokens)
                async for event in client.events(job.id, on_reconnect=lambda *a: reconnects.append(a)):
                    events.append(event)
                    if restart is None and sum(e.event == "delta" for e in events) == 3:
                        front.proc.send_signal(signal.SIGKILL)
                        await asyncio.to_thread(front.stop)
                        env, logdir = slow_stack.env, slow_stack.logdir
                        restart = restart_front_soon(env, logdir, "slow-restarted-2", url, fronts)
                assert restart is not None
                await asyncio.to_thread(restart.join)
                view = await client.status(job.id)
        finally:
            for service in fronts:
                await asyncio.to_thread(service.stop)
        return events, reconnects, view

    events, reconnects, view = asyncio.run(scenario())
    assert reconnects, "the stream was never cut: the test did not test a resume"
    _check_once(events)
    assert events[-1].event == "done"
    text = "".join(e.text for e in events)
    assert view.status == "finished" and view.usage.completion_tokens == tokens
    assert text == view.text
    assert len(text.split()) == tokens  # a word per token: none lost, none twice


def test_api_errors_come_back_typed(slow_stack: SlowStack) -> None:
    with StreamqClient(slow_stack.url, api_key=slow_stack.api_key) as client:
        with pytest.raises(StreamqError) as bad:
            client.submit(prompt="hi", model=slow_stack.model, top_p=5.0)
        assert (bad.value.status, bad.value.type, bad.value.param) == (400, "invalid_request_error", "top_p")
        with pytest.raises(StreamqError) as missing:
            list(client.events("no-such-job"))
        assert (missing.value.status, missing.value.type) == (404, "not_found_error")
        view = client.chat(prompt="hi", model=slow_stack.model, max_tokens=2)
        assert view.status == "finished" and len(view.text.split()) == 2
        with pytest.raises(StreamqError) as ended:
            client.cancel(view.id)
        assert ended.value.status == 409 and ended.value.code == "job_already_ended"
        assert ended.value.job is not None and ended.value.job.status == "finished"
        # The stream of an ended job, resumed after its final event: nothing more (a 204).
        events = list(client.events(view.id))
        assert list(client.events(view.id, last_event_id=events[-1].id)) == []
        assert slow_stack.model in client.models()


def test_the_client_sends_its_api_key(slow_stack: SlowStack) -> None:
    with StreamqClient(slow_stack.url, api_key="wrong-key") as client, pytest.raises(StreamqError) as denied:
        client.models()
    assert (denied.value.status, denied.value.type) == (401, "authentication_error")
    with StreamqClient(slow_stack.url, api_key=slow_stack.api_key) as client:
        assert slow_stack.model in client.models()
    assert httpx.get(f"{slow_stack.url}/", timeout=10).status_code == 200  # the page needs no key
