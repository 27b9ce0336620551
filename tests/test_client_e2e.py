"""The Python client against real fronts: a front restarted mid-stream costs the client nothing
(every event once, the whole answer), sync and async; API errors come back typed."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from typing import Any

import anyio
import httpx
import pytest

from harness.services import Service, start_front
from shared import keys
from shared.schemas import GenerationRequest
from streamq import (
    AsyncStreamqClient,
    Backoff,
    StreamEvent,
    StreamqClient,
    StreamqConnectionError,
    StreamqError,
    StreamqJobError,
)
from tests.conftest import LONG_TOKENS, SlowStack, Stack
from tests.processes import restart_front_soon
from tests.reference_answers import greedy_answer

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


def test_messages_given_as_mappings_reach_the_worker_whole(slow_stack: SlowStack) -> None:
    """A tool conversation as the openai SDK's users write it, plain dicts: the client sent only
    each message's role and content, and the model got another conversation, silently."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
    }
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": "weather in Paris?", "name": "alice"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "22C", "tool_call_id": "call_1"},
    ]
    with StreamqClient(slow_stack.url, api_key=slow_stack.api_key) as client:
        job = client.submit(messages, model=slow_stack.model, max_tokens=2)
        client.wait(job.id)
    stored = slow_stack.redis.client(decode_responses=True).hget(keys.job(job.id), "request")
    assert isinstance(stored, str)
    sent = GenerationRequest.model_validate_json(stored).messages
    assert sent[0].name == "alice" and sent[2].tool_call_id == "call_1"
    assert sent[1].tool_calls is not None and sent[1].tool_calls[0].function.arguments == '{"city": "Paris"}'


def test_chat_raises_for_an_answer_that_did_not_finish_and_cancels_one_it_leaves(
    slow_stack: SlowStack,
) -> None:
    """chat() answers a finished job or raises: a canceled one came back as a view with no text,
    which a script took for an empty answer. A chat() given up (a timeout) cancels its job, whose
    id the caller never had; a stream given up says where to resume."""
    with StreamqClient(slow_stack.url, api_key=slow_stack.api_key) as client:
        canceled: list[str] = []

        def cancel_when_running() -> None:
            while not canceled:
                running = slow_stack.redis.client(decode_responses=True).zrange(keys.RUNNING, 0, -1)
                for job_id in running:
                    assert isinstance(job_id, str)  # decode_responses
                    client.cancel(job_id)
                    canceled.append(job_id)

        canceller = threading.Thread(target=cancel_when_running)
        canceller.start()
        with pytest.raises(StreamqJobError) as stopped:
            client.chat(prompt="hi", model=slow_stack.model, max_tokens=200)
        canceller.join()
        assert stopped.value.job is not None and stopped.value.job.id == canceled[0]
        assert (stopped.value.type, stopped.value.job.status) == ("canceled", "canceled")
        with pytest.raises(StreamqError) as escaped:  # an id is a job's, never another route
            client.status("../models")
        assert escaped.value.status == 404
    with pytest.raises(ValueError, match="must start with http"):
        StreamqClient("localhost:8000")

    async def given_up() -> None:
        async with AsyncStreamqClient(slow_stack.url, api_key=slow_stack.api_key) as client:
            before = _job_ids(slow_stack)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(1.0):
                    await client.chat(prompt="hi", model=slow_stack.model, max_tokens=200)
            (job_id,) = _job_ids(slow_stack) - before
            assert slow_stack.job(job_id)["status"] == "canceled", "it went on, its id unknown to the caller"
            before = _job_ids(slow_stack)
            with anyio.move_on_after(1.0):  # anyio cancels every await of the scope again
                await client.chat(prompt="hi", model=slow_stack.model, max_tokens=200)
            (job_id,) = _job_ids(slow_stack) - before
            assert slow_stack.job(job_id)["status"] == "canceled"

    asyncio.run(given_up())
    dead = StreamqClient("http://127.0.0.1:9", backoff=Backoff(initial=0.01, cap=0.01, max_attempts=1))
    with dead, pytest.raises(StreamqConnectionError) as lost:
        list(dead.events("0" * 32, last_event_id="1-0"))
    assert (lost.value.job_id, lost.value.last_event_id) == ("0" * 32, "1-0")


def _job_ids(slow_stack: SlowStack) -> set[str]:
    r = slow_stack.redis.client(decode_responses=True)
    return {str(r.hget(name, "id")) for name in r.scan_iter(keys.job("*"))}


def test_one_async_client_holds_more_than_a_hundred_streams(slow_stack: SlowStack) -> None:
    """httpx's pool of 100 made the 101st request of a client relaying 100 streams wait, then
    fail as if the front were down."""

    async def scenario() -> float:
        async with AsyncStreamqClient(slow_stack.url, api_key=slow_stack.api_key) as client:
            job = await client.submit(prompt="hi", model=slow_stack.model, max_tokens=200)
            opened = asyncio.Event()
            count = [0]

            async def follow() -> None:
                async for _ in client.events(job.id):
                    count[0] += 1
                    if count[0] == 101:
                        opened.set()
                    await asyncio.sleep(30)  # hold the stream open

            followers = [asyncio.create_task(follow()) for _ in range(101)]
            await asyncio.wait_for(opened.wait(), 30)
            began = time.monotonic()
            await client.status(job.id)
            took = time.monotonic() - began
            for task in followers:
                task.cancel()
            await asyncio.gather(*followers, return_exceptions=True)
            await client.cancel(job.id)
            return took

    assert asyncio.run(scenario()) < 10  # the pool's wait was 30 s
