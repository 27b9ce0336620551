"""OpenAI's fields honoured on the transformers engine, through the official SDK and LangChain
against the real stack (tiny random model): guided JSON and tool calls that validate, logprobs
that match the text, lm-eval's echo + logprobs scoring request, raw completions, logit_bias,
and a two-turn agent loop. tests/test_vllm_engine.py checks the same on the vLLM engine."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import openai
import pytest
from openai.types.chat import (
    ChatCompletionAssistantMessageParam,
    ChatCompletionMessageParam,
    ChatCompletionNamedToolChoiceParam,
    ChatCompletionSystemMessageParam,
)
from openai.types.shared_params import ResponseFormatJSONSchema

from tests.conftest import Stack
from tests.openai_asks import WEATHER, Weather, ask

pytestmark = pytest.mark.e2e

PERSON: dict[str, object] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "mood": {"enum": ["glad", "calm", "tired"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "mood", "tags"],
    "additionalProperties": False,
}


def json_object_or_cut(choice: Any) -> None:
    """json_object allows strings of any length, which a random model may never close: then the
    answer is cut at max_tokens (finish_reason length), as OpenAI's would be; else it is an object."""
    content = choice.message.content or ""
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(content), dict), content
    else:
        assert choice.finish_reason == "length" and content.startswith("{"), content


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_answers_validate_streamed_and_not(
    client: openai.OpenAI, stack: Stack, temperature: float
) -> None:
    fmt: ResponseFormatJSONSchema = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": PERSON, "strict": True},
    }
    whole = client.chat.completions.create(
        **ask(stack, "Describe someone."),
        response_format=fmt,
        temperature=temperature,
        seed=3,
    )
    assert whole.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(whole.choices[0].message.content or ""), PERSON)
    stream = client.chat.completions.create(
        **ask(stack, "Someone else."),
        response_format=fmt,
        temperature=temperature,
        seed=4,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    jsonschema.validate(json.loads(text), PERSON)
    anything = client.chat.completions.create(
        **ask(stack, "JSON please"), response_format={"type": "json_object"}
    )
    json_object_or_cut(anything.choices[0])


def test_a_named_tool_choice_returns_a_call_whose_arguments_validate(
    client: openai.OpenAI, stack: Stack
) -> None:
    choice: ChatCompletionNamedToolChoiceParam = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(
        **ask(stack, "Weather in Paris?"), tools=[WEATHER], tool_choice=choice
    )
    assert whole.choices[0].finish_reason == "tool_calls"
    call = whole.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])

    stream = client.chat.completions.create(
        **ask(stack, "Weather in Oslo?"),
        tools=[WEATHER],
        tool_choice=choice,
        stream=True,
    )
    parts = [t for c in stream if c.choices for t in c.choices[0].delta.tool_calls or []]
    assert parts[0].function.name == "get_weather" and parts[0].id
    arguments = "".join(p.function.arguments or "" for p in parts)
    jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])


def test_tool_choice_required_always_calls(client: openai.OpenAI, stack: Stack) -> None:
    whole = client.chat.completions.create(
        **ask(stack, "Anything."),
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=1.0,
    )
    calls = whole.choices[0].message.tool_calls
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_an_agent_loop_of_two_turns(client: openai.OpenAI, stack: Stack) -> None:
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Rome?"}]
    first = client.chat.completions.create(
        model=stack.model_dir.name,
        messages=messages,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=80,
    )
    assert first.choices[0].message.tool_calls is not None
    call = first.choices[0].message.tool_calls[0]
    assert call.type == "function"
    messages.append(first.choices[0].message)  # the SDK's own object, sent back as it is
    result = {"city": json.loads(call.function.arguments)["city"], "sky": "clear"}
    messages.append({"role": "tool", "tool_call_id": call.id, "content": json.dumps(result)})
    second = client.chat.completions.create(
        model=stack.model_dir.name,
        messages=messages,
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=8,
    )
    assert second.choices[0].message.tool_calls is None
    assert second.choices[0].message.content and second.choices[0].finish_reason in ("stop", "length")
    alone = client.chat.completions.create(
        model=stack.model_dir.name,
        messages=messages[:1],
        tools=[WEATHER],
        tool_choice="none",
        max_tokens=1,
    )
    assert second.usage is not None and alone.usage is not None
    assert (
        second.usage.prompt_tokens > alone.usage.prompt_tokens + 10
    )  # the call and its result were rendered


def test_logprobs_have_top_entries_that_spell_the_answer(client: openai.OpenAI, stack: Stack) -> None:
    whole = client.chat.completions.create(
        **ask(stack, "Count.", 12), temperature=0, logprobs=True, top_logprobs=3
    )
    entries = whole.choices[0].logprobs.content
    assert whole.usage is not None and len(entries) == whole.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert all(e.top_logprobs[0].logprob >= e.top_logprobs[-1].logprob for e in entries)
    answer = whole.choices[0].message.content or ""
    if whole.choices[0].finish_reason == "length":  # no stop sequence: the tokens are the text
        # (a random model's tokens need not make valid UTF-8: decoded as the answer's text is)
        assert b"".join(bytes(e.bytes) for e in entries).decode("utf-8", errors="replace") == answer
    stream = client.chat.completions.create(
        **ask(stack, "Count.", 12),
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    streamed = [
        e for c in stream if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content or []
    ]
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in entries
    ]


def test_lm_evals_loglikelihood_request_scores_every_prompt_token(
    client: openai.OpenAI, stack: Stack, tiny_backend: Any
) -> None:
    ids = tiny_backend.tokenizer("The quick brown fox", add_special_tokens=False)["input_ids"]
    done = client.completions.create(
        model=stack.model_dir.name, prompt=[ids], echo=True, logprobs=1, max_tokens=1, temperature=0
    )
    logprobs = done.choices[0].logprobs
    assert logprobs is not None and logprobs.token_logprobs is not None and logprobs.top_logprobs is not None
    assert len(logprobs.token_logprobs) == len(ids) + 1  # every prompt token, then the answer's
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp is not None and lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert done.choices[0].text.startswith("The quick brown fox")
    # lm-eval's own check: is each token the most likely one at its place?
    for token_logprob, top in zip(logprobs.token_logprobs[1:], logprobs.top_logprobs[1:], strict=True):
        assert top is not None and token_logprob is not None and token_logprob <= max(top.values()) + 1e-6
    # Legacy OpenAI's and vLLM's way: max_tokens 0 with echo, the prompt alone, with the same scores.
    for prompt in ([ids], "The quick brown fox"):
        scored = client.completions.create(
            model=stack.model_dir.name, prompt=prompt, echo=True, logprobs=1, max_tokens=0
        )
        alone = scored.choices[0]
        assert (alone.text, alone.finish_reason) == ("The quick brown fox", "length")
        assert alone.logprobs is not None and alone.logprobs.token_logprobs is not None
        assert alone.logprobs.token_logprobs[0] is None
        assert alone.logprobs.token_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:-1], abs=1e-4)
        assert scored.usage is not None and (scored.usage.prompt_tokens, scored.usage.completion_tokens) == (
            len(ids),
            0,
        )


def test_a_completion_is_raw_not_chat_templated(
    client: openai.OpenAI, stack: Stack, tiny_backend: Any
) -> None:
    text = "Redis streams carry"
    raw = client.completions.create(model=stack.model_dir.name, prompt=text, max_tokens=6, temperature=0)
    assert raw.usage is not None and raw.usage.prompt_tokens == len(tiny_backend.tokenizer(text)["input_ids"])
    ids = client.completions.create(
        model=stack.model_dir.name,
        prompt=tiny_backend.tokenizer(text)["input_ids"],
        max_tokens=6,
        temperature=0,
    )
    assert ids.choices[0].text == raw.choices[0].text
    chat = client.chat.completions.create(**ask(stack, text, 6), temperature=0)
    assert chat.usage is not None and chat.usage.prompt_tokens > raw.usage.prompt_tokens


def test_logit_bias_forces_a_token(client: openai.OpenAI, stack: Stack, tiny_backend: Any) -> None:
    token = tiny_backend.tokenizer(" model", add_special_tokens=False)["input_ids"]
    assert len(token) == 1
    whole = client.chat.completions.create(**ask(stack, "Say anything.", 4), logit_bias={str(token[0]): 100})
    assert whole.choices[0].message.content == " model" * 4


def test_a_token_id_outside_the_vocabulary_is_a_400_naming_its_field_and_makes_no_job(
    client: openai.OpenAI, stack: Stack, tiny_backend: Any
) -> None:
    """An id the model does not have, in ``logit_bias`` or in a prompt of token ids, is refused
    before a job is made (no job id comes back), naming the field as the client sent it."""
    outside = len(tiny_backend.tokenizer) + 10_000
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.with_raw_response.create(
            **ask(stack, "Say anything.", 4), logit_bias={str(outside): 5}
        )
    assert refused.value.body["param"] == "logit_bias", refused.value.body  # type: ignore[index]
    assert f"token id {outside} is not in this model's vocabulary" in refused.value.message
    assert "x-streamq-job-id" not in refused.value.response.headers
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model=stack.model_dir.name, prompt=[5, outside], max_tokens=2)
    assert refused.value.body["param"] == "prompt", refused.value.body  # type: ignore[index]
    assert "x-streamq-job-id" not in refused.value.response.headers


def test_langchain_bind_tools_and_structured_output_return_parsed_objects(stack: Stack) -> None:
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model=stack.model_dir.name, base_url=stack.url + "/v1", api_key="x", max_tokens=80, max_retries=0
    )
    with_tools = llm.bind_tools([Weather], tool_choice="Weather")
    message = with_tools.invoke("Weather in Lima?")
    assert message.tool_calls and message.tool_calls[0]["name"] == "Weather"
    Weather.model_validate(message.tool_calls[0]["args"])
    # The loop's next turn carries the call and its result.
    reply = llm.bind_tools([Weather]).invoke(
        [
            HumanMessage("Weather in Lima?"),
            message,
            ToolMessage(content="sunny", tool_call_id=message.tool_calls[0]["id"], name="Weather"),
        ]
    )
    assert isinstance(reply.content, str)

    for method in ("function_calling", "json_schema"):
        parsed = llm.with_structured_output(Weather, method=method).invoke("Weather in Kyiv?")
        assert isinstance(parsed, Weather), method


def test_a_top_p_of_0_keeps_only_the_most_likely_token_as_openai_takes_it(
    client: openai.OpenAI, stack: Stack, tiny_backend: Any
) -> None:
    """Clients send top_p 0 to mean "no sampling" (OpenAI takes it; vLLM and transformers refuse
    it): at any temperature the answer is the greedy one, on every route."""
    from tests.reference_answers import greedy_answer

    greedy = greedy_answer(tiny_backend, "What is a queue?", 12)
    for temperature in (0.7, 1.5):
        chat = client.chat.completions.create(
            model=stack.model_dir.name,
            messages=[{"role": "user", "content": "What is a queue?"}],
            max_tokens=12,
            temperature=temperature,
            top_p=0,
        )
        assert chat.choices[0].message.content == greedy
    answered = client.responses.create(
        model=stack.model_dir.name, input="What is a queue?", max_output_tokens=12, temperature=1.0, top_p=0
    )
    assert answered.output_text == greedy and answered.top_p == 0


def test_a_conversation_ending_with_an_assistant_or_system_turn_is_answered_in_a_new_turn(
    client: openai.OpenAI, stack: Stack, tiny_backend: Any
) -> None:
    """OpenAI answers such a conversation (an assistant's earlier answer, a system note last) with
    a new assistant turn; the prompt is the whole conversation rendered by the chat template."""
    from shared.schemas import ChatMessage, GenerationRequest, PromptInput

    lasts: list[ChatCompletionAssistantMessageParam | ChatCompletionSystemMessageParam] = [
        {"role": "assistant", "content": "A list."},
        {"role": "system", "content": "Be brief."},
    ]
    for last in lasts:
        messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What is a queue?"}, last]
        completion = client.chat.completions.create(
            model=stack.model_dir.name,
            messages=messages,
            max_tokens=8,
            temperature=0,
        )
        turns = [ChatMessage(**m) for m in messages]
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == len(tiny_backend.encode(PromptInput(messages=turns)))
        alone = GenerationRequest(messages=turns, max_tokens=8, temperature=0.0, top_p=1.0)
        assert completion.choices[0].message.content == "".join(s.delta for s in tiny_backend.generate(alone))
