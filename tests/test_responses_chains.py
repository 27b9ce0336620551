"""``previous_response_id`` chains through the openai SDK, on the stack (two fronts, two workers):
turns carried from front to front, items of the chain sent again, a function call answered with
its output."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from shared.schemas import STRUCTURED_OUTPUT, TOOLS, ChatMessage
from tests.conftest import Stack
from tests.reference_answers import answer_to
from tests.response_items import item_text
from tests.stack_jobs import asked, engines_offer, model_of

pytestmark = [pytest.mark.e2e, pytest.mark.usefixtures("retire_extra_workers")]


def test_a_three_turn_chain_and_store_false(
    client: openai.OpenAI, client2: openai.OpenAI, stack: Stack, tiny_backend: Any
) -> None:
    model, n = model_of(stack), 6
    questions = ["first question", "second question", "third question"]
    turns: list[Any] = []
    for i, question in enumerate(questions):  # from front to front
        chained = {"previous_response_id": turns[-1].id} if turns else {"instructions": "answer briefly"}
        on = (client, client2)[i % 2]
        turns.append(
            on.responses.create(model=model, input=question, temperature=0, max_output_tokens=n, **chained)
        )
    first, second, third = turns
    conversation: list[ChatMessage] = []
    for question, turn in zip(questions, turns, strict=True):
        conversation += [ChatMessage(role="user", content=question)]
        conversation += [ChatMessage(role="assistant", content=turn.output_text)] if turn is not third else []
    assert asked(stack, third.id).messages == conversation  # the instructions were the first turn's
    assert asked(stack, first.id).messages[0] == ChatMessage(role="system", content="answer briefly")
    assert third.output_text == answer_to(tiny_backend, conversation, n)
    assert third.previous_response_id == second.id
    assert [item_text(i) for i in client.responses.input_items.list(third.id).data] == ["third question"]

    unstored = client.responses.create(model=model, input="forget it", store=False, max_output_tokens=2)
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(model=model, input="go on", previous_response_id=unstored.id)
    assert refused.value.body["param"] == "previous_response_id"  # type: ignore[index]


def test_the_previous_responses_items_sent_again_with_it_are_kept_once(
    client: openai.OpenAI, stack: Stack
) -> None:
    """An agent's loop that appends each output to its input and chains with previous_response_id
    too: the model read the answers twice (two assistant turns in a row)."""
    model = model_of(stack)

    def turn(**fields: Any) -> Any:
        return client.responses.create(model=model, temperature=0, max_output_tokens=3, **fields)

    def user(text: str, **more: Any) -> dict[str, Any]:
        return {"role": "user", "content": text, **more}

    first = turn(input="hi")
    out1 = [item.model_dump(exclude_none=True) for item in first.output]
    second = turn(previous_response_id=first.id, input=[*out1, user("more")])
    assert [item_text(i) for i in client.responses.input_items.list(second.id).data] == ["more"]
    out2 = [item.model_dump(exclude_none=True) for item in second.output]
    # Two turns back as well: the first output came through the chain, not in the second's input.
    third = turn(previous_response_id=second.id, input=[*out1, *out2, user("again")])
    clean = turn(previous_response_id=second.id, input=[user("again")])
    by_hand = turn(input=[user("hi"), *out1, user("more"), *out2, user("again")])
    assert (
        asked(stack, third.id).messages
        == asked(stack, clean.id).messages
        == asked(stack, by_hand.id).messages
    )
    assert [m.role for m in asked(stack, third.id).messages] == ["user", "assistant"] * 2 + ["user"]
    # Only the ids streamq made are taken for the chain's items: a client's own ids are its own.
    numbered = turn(input=[user("what is two and two", id="item-0")])
    next_one = turn(previous_response_id=numbered.id, input=[user("and three", id="item-0")])
    assert asked(stack, next_one.id).messages[-1].content == "and three"
    # Nothing new: a 400 naming the input, not the last turn answered again.
    with pytest.raises(openai.BadRequestError) as refused:
        turn(previous_response_id=second.id, input=[*out1, *out2])
    assert refused.value.body["param"] == "input"  # type: ignore[index]


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}


def test_a_function_call_answered_with_its_output(client: openai.OpenAI, stack: Stack) -> None:
    model = model_of(stack)
    ask: dict[str, Any] = {
        "model": model,
        "input": "What is the weather in Paris?",
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "name": "get_weather"},  # a random model calls too
        "temperature": 0,
        "max_output_tokens": 64,
    }
    if not engines_offer(stack, TOOLS, STRUCTURED_OUTPUT):
        with pytest.raises(openai.BadRequestError) as refused:
            client.responses.create(**ask)
        assert refused.value.body["param"] in ("tool_choice", "tools")  # type: ignore[index]
        return
    called = client.responses.create(**ask)
    [call] = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments)["city"] in ("Paris", "Rome")
    answered = client.responses.create(
        model=model,
        previous_response_id=called.id,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}],
        tools=[WEATHER],  # type: ignore[list-item]
        max_output_tokens=8,
    )
    assert answered.status in ("completed", "incomplete")
    turns = asked(stack, answered.id).messages
    assert [m.role for m in turns] == ["user", "assistant", "tool"]
    assert turns[1].tool_calls is not None and turns[1].tool_calls[0].id == call.call_id
    assert (turns[2].tool_call_id, turns[2].content, turns[2].name) == (
        call.call_id,
        "sunny, 21 C",
        "get_weather",
    )
