"""OpenAI's Responses API through the official ``openai`` SDK against the real stack (two fronts,
two workers, a private Redis): background responses polled to their end, streams cut and resumed
on the other front, cancels, a worker killed mid-response, structured output, another key's
response, and refusals (``previous_response_id`` chains and function calls: test_responses_chains)."""

from __future__ import annotations

import json
import signal
import threading
import time
from typing import Any

import httpx
import openai
import pytest

from harness.services import wait_for
from shared.schemas import STRUCTURED_OUTPUT, ChatMessage
from tests.conftest import LONG_TOKENS, STACK_CAPACITY, Stack, openai_client
from tests.reference_answers import greedy, greedy_answer
from tests.secure_stack import KEYS, MODEL, SecureStack
from tests.sse import follow, text_of
from tests.stack_jobs import engines_offer, job_of, model_of, running_on, start_workers

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("retire_extra_workers")]

STOP_TOKENS = 200
ENDED = ("completed", "incomplete", "failed", "cancelled")


def polled(client: openai.OpenAI, response_id: str, timeout: float = 120) -> Any:
    deadline = time.monotonic() + timeout
    while (response := client.responses.retrieve(response_id)).status not in ENDED:
        assert time.monotonic() < deadline, response
        time.sleep(0.05)
    return response


@pytest.fixture(scope="session")
def stopping_prompt(tiny_backend: Any) -> tuple[str, str]:
    """A prompt whose greedy answer ends (end of sequence) within STOP_TOKENS tokens, and that
    answer: found here rather than assumed."""
    for prompt in (f"say something {i}" for i in range(80)):
        steps = list(tiny_backend.generate(greedy([ChatMessage(role="user", content=prompt)], STOP_TOKENS)))
        if steps[-1].finish_reason == "stop":
            return prompt, "".join(step.delta for step in steps)
    pytest.fail("the tiny model ran every candidate prompt to its length")


def test_a_background_response_is_polled_to_completed(
    client: openai.OpenAI, client2: openai.OpenAI, stack: Stack, stopping_prompt: tuple[str, str]
) -> None:
    prompt, answer = stopping_prompt
    created = client.responses.create(
        model=model_of(stack), input=prompt, background=True, temperature=0, max_output_tokens=STOP_TOKENS
    )
    assert created.status == "queued" and created.background is True
    done = polled(client2, created.id)
    assert (done.status, done.output_text) == ("completed", answer)
    events = follow(httpx.Client(timeout=30), stack.url, job_of(created.id))
    assert done.output_text == text_of(events)  # the job's own text, delta by delta
    assert (
        done.usage is not None and done.usage.output_tokens == events[-1].data["usage"]["completion_tokens"]
    )
    assert done.usage.input_tokens == events[-1].data["usage"]["prompt_tokens"] > 0

    cut = client.responses.create(model=model_of(stack), input=prompt, temperature=0, max_output_tokens=3)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens" and cut.usage and cut.usage.output_tokens == 3


def test_a_stream_cut_halfway_resumes_on_the_other_front(
    client: openai.OpenAI, client2: openai.OpenAI, stack: Stack, tiny_backend: Any, long_prompts: list[str]
) -> None:
    prompt, tokens = long_prompts[0], 300
    first: list[Any] = []
    with client.responses.create(
        model=model_of(stack),
        input=prompt,
        background=True,
        stream=True,
        temperature=0,
        max_output_tokens=tokens,
    ) as stream:
        for event in stream:
            first.append(event)
            if sum(e.type == "response.output_text.delta" for e in first) == 3:
                break  # the connection goes: a background response runs on
    response_id = first[0].response.id
    rest = list(
        client2.responses.retrieve(response_id, stream=True, starting_after=first[-1].sequence_number)
    )
    events = first + rest
    assert [e.sequence_number for e in events] == list(range(len(events)))  # no gap, no repeat
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == greedy_answer(tiny_backend, prompt, tokens)
    assert events[-1].type == "response.incomplete" and events[-1].response.output_text == text

    # The SDK's stream helper resumes the same way (it replays and skips on its side).
    with client2.responses.stream(response_id=response_id, starting_after=10) as resumed:
        numbers = [event.sequence_number for event in resumed]
    assert numbers == list(range(11, len(events)))


def test_a_foreground_stream_whose_client_goes_is_cancelled(
    client: openai.OpenAI, stack: Stack, long_prompts: list[str]
) -> None:
    with client.responses.create(
        model=model_of(stack), input=long_prompts[1], stream=True, max_output_tokens=LONG_TOKENS
    ) as stream:
        response_id = next(iter(stream)).response.id  # type: ignore[union-attr]
        for event in stream:
            if event.type == "response.output_text.delta":
                break  # the client goes: a foreground response is cancelled
    gone = polled(client, response_id, timeout=30)
    assert gone.status == "cancelled" and gone.usage is None


def test_cancel_a_queued_and_a_running_response_frees_its_slot(
    client: openai.OpenAI, client2: openai.OpenAI, stack: Stack, long_prompts: list[str]
) -> None:
    model = model_of(stack)
    busy = [
        client.responses.create(
            model=model,
            input=long_prompts[i % 3],
            background=True,
            temperature=0,
            max_output_tokens=LONG_TOKENS,
        )
        for i in range(STACK_CAPACITY)
    ]
    try:
        wait_for(
            lambda: all(client.responses.retrieve(r.id).status == "in_progress" for r in busy),
            60,
            "every slot to be busy",
        )
        queued = client.responses.create(
            model=model, input="never runs", background=True, max_output_tokens=4
        )
        assert client.responses.retrieve(queued.id).status == "queued"
        cancelled = client2.responses.cancel(queued.id)
        assert (cancelled.status, cancelled.output) == ("cancelled", [])
        kinds = [e.type for e in client.responses.retrieve(queued.id, stream=True)]
        assert kinds == ["response.created", "response.queued", "response.cancelled"]

        stopped = client2.responses.cancel(busy[0].id)
        assert stopped.status == "cancelled" and stopped.output[0].type == "message"
        assert stopped.output[0].status == "incomplete"
        job = httpx.get(f"{stack.url}/v1/jobs/{job_of(busy[0].id)}", timeout=10).json()
        assert job["status"] == "canceled" and job["usage"]["completion_tokens"] < LONG_TOKENS
        # Its slot is free: a new response runs while the other slots are still busy.
        after = client.responses.create(model=model, input="now", background=True, max_output_tokens=4)
        assert polled(client, after.id, timeout=60).status in ("completed", "incomplete")
        assert all(client.responses.retrieve(r.id).status == "in_progress" for r in busy[1:])
    finally:
        for response in busy:
            if client.responses.retrieve(response.id).status in ("queued", "in_progress"):
                client.responses.cancel(response.id)


def test_a_killed_workers_response_completes_with_the_clean_greedy_text(
    client: openai.OpenAI, client2: openai.OpenAI, stack: Stack, tiny_backend: Any, long_prompts: list[str]
) -> None:
    model = "resp-kill"
    workers = start_workers(stack, model, "--slots", "2")
    prompt = long_prompts[2]
    created = client.responses.create(
        model=model, input=prompt, background=True, temperature=0, max_output_tokens=LONG_TOKENS
    )
    events: list[Any] = []
    reader = threading.Thread(
        target=lambda: events.extend(client2.responses.retrieve(created.id, stream=True))
    )
    reader.start()
    slot = running_on(stack, job_of(created.id), 100)
    victim = next(w for w in workers if slot == w.name)
    victim.proc.send_signal(signal.SIGKILL)
    reader.join(timeout=180)
    assert not reader.is_alive()
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events].count("response.in_progress") == 1
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == greedy_answer(tiny_backend, prompt, LONG_TOKENS)  # no gap, no repeat
    final = events[-1].response
    assert (events[-1].type, final.output_text) == ("response.incomplete", text)
    assert final.usage.output_tokens == LONG_TOKENS
    assert client.responses.retrieve(created.id).output_text == text


def test_text_format_json_schema_gives_json_that_follows_it(client: openai.OpenAI, stack: Stack) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    text: Any = {"format": {"type": "json_schema", "name": "verdict", "schema": schema, "strict": True}}
    ask: dict[str, Any] = {"model": model_of(stack), "input": "Is it ok?", "text": text, "temperature": 0}
    if not engines_offer(stack, STRUCTURED_OUTPUT):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**ask)
        assert refused.value.body["param"] == "text.format"  # type: ignore[index]
        assert "'text.format'" in refused.value.body["message"]  # type: ignore[index]
        return
    response = client.responses.create(**ask, max_output_tokens=32)
    assert isinstance(json.loads(response.output_text)["ok"], bool)
    # A schema only the worker finds unusable: the stream's error event names the field as sent.
    text["format"]["schema"] = {"type": "strin"}
    events = list(client.responses.create(**ask, stream=True))
    [error] = [e for e in events if e.type == "error"]
    assert error.param == "text.format" and error.message.startswith("text.format: "), error
    assert events[-1].type == "response.failed"


def test_another_keys_response_is_not_found(secure: SecureStack) -> None:
    with openai_client(secure.a, KEYS["alice"]) as alice, openai_client(secure.b, KEYS["bob"]) as bob:
        mine = alice.responses.create(model=MODEL, input="mine", background=True, max_output_tokens=5)
        for call in (
            lambda: bob.responses.retrieve(mine.id),
            lambda: list(bob.responses.retrieve(mine.id, stream=True)),
            lambda: bob.responses.cancel(mine.id),
            lambda: bob.responses.delete(mine.id),
            lambda: bob.responses.input_items.list(mine.id),
        ):
            with pytest.raises(openai.NotFoundError):
                call()
        with pytest.raises(openai.BadRequestError) as refused:  # as OpenAI answers a missing one
            bob.responses.create(model=MODEL, input="x", previous_response_id=mine.id)
        assert refused.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
        with openai_client(secure.b, KEYS["alice"]) as alice_b:  # the owner, on the other front
            assert polled(alice_b, mine.id).status in ("completed", "incomplete")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": [{"type": "web_search"}]}, "tools.0"),
        ({"reasoning": {"effort": "high"}}, "reasoning.effort"),
        ({"include": ["message.output_text.logprobs"]}, "include"),
        ({"truncation": "auto"}, "truncation"),
        ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ],
)
def test_an_unsupported_field_is_a_400_naming_it(
    client: openai.OpenAI, stack: Stack, fields: dict[str, Any], param: str
) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model_of(stack), input="hi", **fields)
    assert refused.value.body["param"] == param  # type: ignore[index]


def test_an_empty_input_is_a_400_that_says_input(client: openai.OpenAI, stack: Stack) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model_of(stack), input=[])
    body = refused.value.body
    assert body["param"] == "input" and "'input' must not be empty" in body["message"], body  # type: ignore[index]
