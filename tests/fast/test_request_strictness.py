"""What a user's trial found accepted and then ignored, or refused without naming the field:
each is now a 400 naming what is wrong, as OpenAI answers it, while what clients send back from
an answer (the SDK's ``messages.append(answer.choices[0].message)``) is still taken."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import APIStatusError, BadRequestError
from pydantic import BaseModel

from api.openai_format import TextOffsets, text_logprobs
from shared.schemas import JobError
from tests.fast.conftest import Front, openai_of

pytestmark = pytest.mark.anyio

MODEL = "fake-model"


class Size(BaseModel):
    size: str


USER: Any = {"role": "user", "content": "one two"}


def _tool(name: str, parameters: Any = None) -> Any:
    return {"type": "function", "function": {"name": name, "parameters": parameters or {"type": "object"}}}


@pytest.mark.parametrize(
    ("fields", "param", "says"),
    [
        (
            {"messages": [USER | {"foo": 1}]},
            "messages.0.foo",
            "'messages.0.foo' is not a parameter of POST /v1/chat/completions",
        ),
        ({"messages": [USER | {"content": []}]}, "messages.0.content", "an empty list of content parts"),
        (
            {"messages": [USER | {"content": [{"type": "text", "text": "hi", "cache_control": {}}]}]},
            "messages.0.content",
            "a text content part has only 'type' and 'text', not 'cache_control'",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "refusal": "no"}, USER]},
            "messages.0.refusal",
            "",
        ),
        (
            {"messages": [USER], "response_format": {"type": "json_schema", "json_schema": {"schema": {}}}},
            "response_format.json_schema.name",
            "Field required",
        ),
        (
            {"messages": [USER], "tools": [_tool("add"), _tool("add")]},
            "tools.1.function.name",
            "the function name 'add' is given twice",
        ),
        (  # a call's arguments are keyword arguments: a string or array schema made "\"gKers\""
            {"messages": [USER], "tools": [_tool("add", {"type": "string"})]},
            "tools.0.function.parameters",
            "Invalid schema for function 'add': schema must be a JSON Schema of 'type: \"object\"', "
            "got 'type: \"string\"'",
        ),
        (
            {"messages": [USER], "tools": [_tool("f", {"anyOf": []})]},
            "tools.0.function.parameters",
            "got 'type: \"None\"'",
        ),
        (  # OpenAI's custom (free-form text) tools: no template here renders one, nor parses its calls
            {"messages": [USER], "tools": [{"type": "custom", "custom": {"name": "shell"}}]},
            "tools.0.type",
            'tools of type "custom" are not supported',
        ),
        ({"messages": [USER], "logprobs": "true"}, "logprobs", "Input should be a valid boolean"),
        ({"messages": [USER | {"content": 5}]}, "messages.0.content", "Input should be a valid string"),
        (  # str.isdigit() takes '²' (a 500 before: int('²') fails) and '١٢' (taken as token 12)
            {"messages": [USER], "logit_bias": {"²": 1}},
            "logit_bias",
            "logit_bias keys are token ids, got '²'",
        ),
        ({"messages": [USER], "logit_bias": {"١٢": 1}}, "logit_bias", "got '١٢'"),
        # JSON's true is no number (it ran as a penalty of 1); a tiny penalty overflowed the scores
        ({"messages": [USER], "presence_penalty": True}, "presence_penalty", "a valid number"),
        ({"messages": [USER], "frequency_penalty": False}, "frequency_penalty", "a valid number"),
        ({"messages": [USER], "extra_body": {"repetition_penalty": True}}, "repetition_penalty", "number"),
        ({"messages": [USER], "logit_bias": {"5": True}}, "logit_bias.5", "a valid number"),
        (
            {"messages": [USER], "extra_body": {"repetition_penalty": 1e-300}},
            "repetition_penalty",
            "greater than or equal to 0.01",
        ),
        (
            {"messages": [USER], "tool_choice": {"type": "custom", "custom": {"name": "shell"}}},
            "tool_choice",
            'a tool_choice of type "custom" is not supported',
        ),
        (
            {"messages": [USER], "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto"}}},
            "tool_choice",
            'a tool_choice of type "allowed_tools" is not supported',
        ),
    ],
)
async def test_chat_refuses_what_it_would_have_ignored(
    front: Front, fields: dict[str, Any], param: str, says: str
) -> None:
    with pytest.raises(BadRequestError) as refused:
        await openai_of(front).chat.completions.create(model=MODEL, **fields)
    body: Any = refused.value.body
    assert body["param"] == param and says in body["message"], body
    if says.startswith("Invalid schema for function"):  # OpenAI's code, which clients branch on
        assert body["code"] == "invalid_function_parameters", body
    assert not front.jobs.jobs


async def test_a_returned_message_sent_back_whole_is_taken(front: Front) -> None:
    client = openai_of(front)
    first = await client.chat.completions.create(model=MODEL, messages=[USER])
    returned = first.choices[0].message
    assert returned.refusal is None
    again = await client.chat.completions.create(
        model=MODEL,
        messages=[USER, returned.model_dump(), {"role": "user", "content": "three", "name": "ann"}],  # type: ignore[list-item]
    )
    assert again.choices[0].message.content == "three"
    # The SDK's parse() answer carries "parsed" when sent back; a tool that found nothing, [].
    parsed = await client.chat.completions.parse(
        model=MODEL, messages=[{"role": "user", "content": '{"size":"small"}'}], response_format=Size
    )
    assert parsed.choices[0].message.parsed == Size(size="small")
    call: Any = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    turns: Any = [
        USER,
        parsed.choices[0].message,
        USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": []},
        {"role": "user", "content": "four"},
    ]
    last = await client.chat.completions.create(model=MODEL, messages=turns, tools=[_tool("add")])
    assert last.choices[0].message.content == "four"


async def test_responses_refuse_stream_options_without_a_stream_and_twice_named_tools(front: Front) -> None:
    client = openai_of(front)
    flat = {"type": "function", "name": "add", "parameters": {"type": "object"}}
    for fields, param in (
        ({"stream_options": {"include_obfuscation": False}}, "stream_options"),
        ({"tools": [flat, flat]}, "tools.1.name"),
    ):
        with pytest.raises(BadRequestError) as refused:
            await client.responses.create(model=MODEL, input="x", **fields)
        body: Any = refused.value.body
        assert body["param"] == param, body
    streamed = await client.responses.create(
        model=MODEL, input="x", stream=True, stream_options={"include_obfuscation": False}
    )
    assert [e.type async for e in streamed][-1] == "response.completed"


async def test_echoed_logprobs_over_the_prompt_limit_name_logprobs(front: Front) -> None:
    with pytest.raises(BadRequestError) as refused:
        await openai_of(front).completions.create(model=MODEL, prompt="one", echo=True, logprobs=6)
    body: Any = refused.value.body
    assert body["param"] == "logprobs" and "with echo, logprobs is at most 5" in body["message"], body


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions/"),
        ("GET", "/v1/jobs/"),
        ("GET", "/v1/models/"),
        ("GET", f"/v1/models/{MODEL}/"),
    ],
)
async def test_a_trailing_slash_is_a_404_in_the_envelope_not_a_redirect(
    front: Front, method: str, path: str
) -> None:
    answer = await front.http.request(method, path, json={"model": MODEL, "messages": [USER]})
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "unknown_url" and "location" not in answer.headers


def test_text_offsets_count_bytes_that_make_no_character_as_the_answer_shows_them() -> None:
    def entry(raw: bytes) -> dict[str, Any]:
        return {"token": raw.decode("utf-8", "replace"), "logprob": -1.0, "bytes": list(raw)}

    # "jou", two stray continuation bytes (U+FFFD twice in the text), then a control character.
    stray = [entry(b"jou"), entry(b"\x80\x81"), entry(b"\x07")]
    assert text_logprobs(stray)["text_offset"] == [0, 3, 5]
    # A character split over two tokens begins where the second does; what follows, after it.
    split = [entry("日".encode()[:2]), entry("日".encode()[2:]), entry(b"x")]
    assert text_logprobs(split)["text_offset"] == [0, 0, 1]
    # A lead byte that the next token does not go on with: its U+FFFD is before that token (the
    # text is "ab\ufffd trav"; " trav" was at 2 before, inside "ab\ufffd").
    stranded = [entry(b"ab\xe5"), entry(b" trav"), entry(b"\xf0\x9f"), entry(b"\x9a\x80!")]
    assert text_logprobs(stranded)["text_offset"] == [0, 3, 8, 8]
    # A lead byte the next token goes on with and then breaks: the U+FFFD is that token's. A
    # surrogate's bytes (ED A0) are two U+FFFD, before the token that follows them.
    assert text_logprobs([entry(b"\xf0"), entry(b"\x90a")])["text_offset"] == [0, 0]
    assert text_logprobs([entry(b"\xed\xa0"), entry(b"a")])["text_offset"] == [0, 2]
    assert text_logprobs([entry(b"\xed"), entry(b"\xa0"), entry(b"a")])["text_offset"] == [0, 1, 2]


def test_an_echoed_prompts_special_tokens_take_their_place_in_its_text() -> None:
    def entry(token: str, raw: bytes) -> dict[str, Any]:
        return {"token": token, "logprob": -1.0, "bytes": list(raw)}

    spelled = [entry("<|im_end|>", b""), entry("hel", b"hel"), entry("lo", b"lo"), entry("j", b"j")]
    # The prompt's text spells the special token: the tokens after it begin after it.
    assert text_logprobs(spelled, TextOffsets("<|im_end|>hello"))["text_offset"] == [0, 10, 13, 15]
    # A token the tokenizer added (a BOS), which the text does not spell, takes no room.
    assert text_logprobs(spelled, TextOffsets("hello"))["text_offset"] == [0, 0, 3, 5]


def test_tokens_that_are_part_of_a_character_are_named_by_their_bytes_and_never_share_a_key() -> None:
    # Two such tokens were both "\ufffd" in a place's top_logprobs: one key, the other's value.
    chosen = {"token": "\ufffd", "logprob": -1.0, "bytes": [0xE4, 0xBD]}
    alternatives = [
        {"token": "day", "logprob": -0.5, "bytes": list(b"day")},
        chosen,
        {"token": "\ufffd", "logprob": -1.5, "bytes": [0xE5]},
        {"token": "<|im_end|>", "logprob": -2.0, "bytes": []},  # a special token: named, no bytes
    ]
    shown = text_logprobs([chosen | {"top_logprobs": alternatives}])
    assert shown["tokens"] == ["bytes:\\xe4\\xbd"]
    keys = {"day": -0.5, "bytes:\\xe4\\xbd": -1.0, "bytes:\\xe5": -1.5, "<|im_end|>": -2.0}
    assert shown["top_logprobs"] == [keys]


async def test_echo_may_be_null_as_in_openais_schema(front: Front) -> None:
    texts = []
    for echo in (None, False, True):
        body = {"model": MODEL, "prompt": "one two", "echo": echo, "temperature": 0}
        answer = await front.http.post("/v1/completions", json=body)
        assert answer.status_code == 200, answer.text
        texts.append(answer.json()["choices"][0]["text"])
    assert texts[0] == texts[1] and texts[2] == "one two" + texts[1]  # null is no echo


async def test_a_union_field_names_the_bad_item_and_says_its_types_once(front: Front) -> None:
    """A token-id prompt with a negative id is about that id (it was ``prompt.0`` and three
    complaints, two of them types the prompt is not); a stop of no type it takes says its
    types in one phrase (it said the field twice)."""
    with pytest.raises(BadRequestError) as refused:
        await openai_of(front).completions.create(model=MODEL, prompt=[1, -2])
    body: Any = refused.value.body
    assert body["param"] == "prompt.1" and body["message"] == (
        "prompt.1: Input should be greater than or equal to 0"
    ), body
    wrong_stop: Any = 5
    with pytest.raises(BadRequestError) as refused:
        await openai_of(front).chat.completions.create(model=MODEL, messages=[USER], stop=wrong_stop)
    body = refused.value.body
    assert body["param"] == "stop", body
    assert body["message"] == "stop: Input should be a valid string, or a valid list", body
    with pytest.raises(BadRequestError) as refused:
        await openai_of(front).completions.create(model=MODEL, prompt=wrong_stop)
    body = refused.value.body  # four members, two kinds: each said once
    assert body["message"] == "prompt: Input should be a valid string, or a valid list", body
    # A member that is a literal does not hide what is wrong inside the object member.
    choice: Any = {"type": "function", "function": "add"}
    with pytest.raises(BadRequestError) as refused:
        await openai_of(front).chat.completions.create(
            model=MODEL, messages=[USER], tools=[_tool("add")], tool_choice=choice
        )
    body = refused.value.body
    assert "tool_choice.function: Input should be a valid dictionary" in body["message"], body


@pytest.mark.parametrize(
    ("failure", "status"),
    [("expired", 504), ("generation_error", 502)],
)
async def test_a_job_that_fails_on_its_worker_answers_its_status(
    front: Front, failure: str, status: int
) -> None:
    """A route that waits for the answer: a job past its queue_ttl is a 504 (a time limit, like the
    front's own wait); one the worker failed, a 502. The SDK raises both as 5xx errors."""
    front.jobs.fail_with = JobError(type=failure, message="it went wrong")
    client = openai_of(front).with_options(max_retries=1)
    with pytest.raises(APIStatusError) as failed:
        await client.chat.completions.create(model=MODEL, messages=[USER])
    assert failed.value.status_code == status
    body: Any = failed.value.body
    assert (body["type"], body["message"]) == (failure, "it went wrong")
    # The SDK sends it again after a 5xx, as a new job: not a job that waited out its queue_ttl
    # (x-should-retry: false), which would wait again.
    assert len(front.jobs.jobs) == (1 if failure == "expired" else 2)


SCHEMA = {"type": "object", "properties": {"a": {"type": "string", "description": "\ud800"}}}


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/responses", {"input": "hi", "metadata": {"\udc00": "v"}}, "metadata"),
        ("/v1/responses", {"input": "hi", "metadata": {"k": "\ud800"}}, "metadata.k"),
        ("/v1/responses", {"input": "hi", "user": "\ud800", "background": True}, "user"),
        (
            "/v1/responses",
            {"input": "hi", "stream": True, "safety_identifier": "\ud800"},
            "safety_identifier",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [USER],
                "tools": [{"type": "function", "function": {"name": "f", "parameters": SCHEMA}}],
            },
            "tools.0.function.parameters.properties.a.description",
        ),
        (
            "/v1/jobs",
            {
                "prompt": "x",
                "response_format": {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}},
            },
            "response_format.json_schema.schema.properties.a.description",
        ),
        ("/", {"prompt": "x", "history": [["\ud800", "a"]]}, "history.0.0"),
    ],
)
async def test_a_lone_surrogate_anywhere_in_a_body_is_a_400_naming_it_and_makes_no_job(
    front: Front, path: str, body: dict[str, Any], param: str
) -> None:
    """A JSON body can escape half a surrogate pair ("\\ud800"); text that is not valid Unicode
    fails where it is encoded (the response, its record, an SSE event): a 400 before any job, not
    a 500 after one (a user's trial found both, from fields the schemas do not check as text)."""
    sent = json.dumps({"model": MODEL, **body})  # ASCII: the escapes travel as a client sends them
    response = await front.http.post(path, content=sent, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == (param, "invalid_unicode") and "lone surrogate" in error[
        "message"
    ]
    assert not front.jobs.jobs


async def test_a_lone_surrogate_sent_as_raw_bytes_or_in_utf_16_is_refused_and_a_pair_or_a_backslash_is_not(
    front: Front,
) -> None:
    """Python's JSON reader takes a surrogate's UTF-8 bytes (it decodes with surrogatepass) and
    UTF-16 bodies, so neither gets past the check; an escaped pair (an emoji, as json.dumps sends
    it) and an escaped backslash before "ud800" are text like any other."""
    headers = {"Content-Type": "application/json"}
    for body in (
        b'{"input": "hi", "metadata": {"k": "\xed\xa0\x80"}}',
        '{"input": "hi", "metadata": {"k": "\\ud800"}}'.encode("utf-16"),
    ):
        refused = await front.http.post("/v1/responses", content=body, headers=headers)
        assert (refused.status_code, refused.json()["error"]["param"]) == (400, "metadata.k"), refused.text
    assert not front.jobs.jobs
    for text in ("\U0001f600", "\\ud800"):
        sent = json.dumps({"model": MODEL, "input": "hi", "metadata": {"k": text}})
        taken = await front.http.post("/v1/responses", content=sent, headers=headers)
        assert taken.status_code == 200 and taken.json()["metadata"] == {"k": text}, taken.text


async def test_the_job_api_takes_an_assistant_turn_of_calls_alone_with_null_content(front: Front) -> None:
    """The openai SDK's model_dump() of a turn of calls says "content": null: the chat route took
    it, the job API (and so the streamq client, which sends dicts as given) answered a 400."""
    call: Any = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    turns = [
        {"role": "user", "content": "add"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"},
    ]
    taken = await front.http.post("/v1/jobs", json={"messages": turns, "max_tokens": 2})
    assert taken.status_code == 202, taken.text
    (job,) = [j for j in front.jobs.jobs.values() if j.request.messages[-1].content == "3"]
    assert job.request.messages[1].content == "" and job.request.messages[1].tool_calls is not None
    refused = await front.http.post("/v1/jobs", json={"messages": [{"role": "user", "content": None}]})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "messages.0.content"
