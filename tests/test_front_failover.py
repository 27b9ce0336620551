"""A front killed mid-stream: the client re-attaches to another front and misses nothing."""

from __future__ import annotations

import signal
from typing import Any

import httpx
import pytest

from harness.services import start_front
from tests.conftest import LONG_TOKENS, Stack
from tests.reference_answers import greedy_answer
from tests.sse import SSE, follow, read_events, text_of

pytestmark = pytest.mark.e2e


def test_a_client_whose_front_is_killed_resumes_on_another_with_last_event_id(
    stack: Stack, tiny_backend: Any, long_prompts: list[str]
) -> None:
    doomed, doomed_url = start_front(stack.env, stack.logdir, "front-doomed")
    prompt = long_prompts[2]
    received: list[SSE] = []
    with httpx.Client(timeout=60) as client:
        body = {"prompt": prompt, "max_tokens": LONG_TOKENS, "temperature": 0}
        job = client.post(f"{doomed_url}/v1/jobs", json=body).json()
        try:
            with client.stream("GET", f"{doomed_url}/v1/jobs/{job['id']}/events") as response:
                for event in read_events(response):
                    if event is None:
                        continue
                    received.append(event)
                    if sum(e.event == "delta" for e in received) == 3:
                        doomed.proc.send_signal(signal.SIGKILL)  # mid-answer, no goodbye
        except httpx.HTTPError:
            pass  # the connection died with the front
        finally:
            doomed.stop()
        assert received[-1].event not in ("done", "error", "canceled")
        rest = follow(client, stack.url2, job["id"], last_event_id=received[-1].id)
    events = received + rest
    assert events[-1].event == "done"
    assert len({e.id for e in events}) == len(events)  # nothing twice
    assert text_of(events) == greedy_answer(tiny_backend, prompt, LONG_TOKENS)
