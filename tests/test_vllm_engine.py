"""The vLLM engine through the whole stack (issue 13): real vLLM (the CPU build), real Redis, real
fronts and workers. Its answers are checked against vLLM run alone in this process (offline
``LLM.generate`` with the same sampling), and the queue's promises are checked as for the
transformers engine: slots, cancels, stop sequences, seeds, a SIGKILL mid-answer. Log
probabilities (the answer's and the prompt's) are checked against offline vLLM and a
transformers forward pass of the same weights; raw prompts and tools go through the job API.

vLLM takes tens of seconds to start, so the module starts it three times in all: one worker
(module fixture), the offline reference, and one more worker for the crash test."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from harness.services import Service, wait_for
from shared.schemas import ChatMessage, PromptInput
from tests.conftest import Stack
from tests.sse import SSE, follow, text_of
from tests.vllm_reference import Reference, logprob_rows
from tests.vllm_required import need_vllm
from tests.vllm_stack import (
    MAX_LEN,
    MODEL,
    SLOTS,
    logprobs_of,
    prompt_logprobs_of,
    refused_start,
    serving,
    spelled,
    start_vllm_worker,
    streamed,
    submit,
    token_of,
    view,
)

need_vllm()

pytestmark = pytest.mark.e2e

PROMPTS = [f"Tell me about queues, part {i}." for i in range(6)]


@pytest.fixture(scope="module")
def vllm_worker(stack: Stack, hd64_model: Path) -> Iterator[Service]:
    worker = start_vllm_worker(stack, hd64_model, "vllm-a")
    try:
        wait_for(lambda: serving(stack) == 1 or not worker.alive(), 600, "the vLLM worker")
    except TimeoutError:
        pytest.fail("the vLLM worker did not come up:\n" + worker.log()[-6000:])
    assert worker.alive(), worker.log()[-6000:]
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def reference(hd64_model: Path, vllm_worker: Service) -> Reference:
    return Reference(hd64_model)


@pytest.fixture(scope="module")
def transformers_logprobs(hd64_model: Path) -> Any:
    return logprob_rows(hd64_model)


def test_greedy_jobs_run_together_equal_vllm_alone_and_never_exceed_the_slots(
    stack: Stack, vllm_worker: Service, reference: Reference
) -> None:
    ids = [submit(stack.url, p, 48) for p in PROMPTS]  # 3 × the worker's 2 slots
    with ThreadPoolExecutor(len(ids)) as pool:
        results = list(pool.map(lambda job_id: streamed(stack, job_id), ids))
    views = [view(stack, i) for i in ids]
    # The most jobs running at one instant, from each job's own start and end times.
    edges = sorted([(v["started_at"], 1) for v in views] + [(v["finished_at"], -1) for v in views])
    running, most_running = 0, 0
    for _at, change in edges:
        running += change
        most_running = max(most_running, running)
    assert most_running == SLOTS
    for prompt, job_id, events in zip(PROMPTS, ids, results, strict=True):
        expected = reference.answer(prompt, 48)
        assert events[-1].event == "done"
        assert text_of(events) == expected == view(stack, job_id)["text"], prompt


def test_a_seeded_sampled_job_equals_itself_run_alone(stack: Stack, vllm_worker: Service) -> None:
    sampled = {"temperature": 0.9, "top_p": 0.9, "top_k": 40, "seed": 1234}
    alone = submit(stack.url, PROMPTS[0], 40, **sampled)
    alone_text = text_of(streamed(stack, alone))
    together = [submit(stack.url, PROMPTS[0], 40, **sampled), submit(stack.url, PROMPTS[1], 40)]
    results = [text_of(streamed(stack, job_id)) for job_id in together]
    assert results[0] == alone_text
    other = submit(stack.url, PROMPTS[0], 40, **{**sampled, "seed": 99})
    assert text_of(streamed(stack, other)) != alone_text  # the seed matters


def test_a_stop_sequence_ends_only_its_own_job(
    stack: Stack, vllm_worker: Service, reference: Reference
) -> None:
    full = reference.answer(PROMPTS[2], 48)
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop.strip(), full
    stopped = submit(stack.url, PROMPTS[2], 48, stop=[stop])
    other = submit(stack.url, PROMPTS[2], 48)
    stopped_events, other_events = streamed(stack, stopped), streamed(stack, other)
    assert text_of(stopped_events) == full[: full.index(stop)]
    assert stopped_events[-1].data["finish_reason"] == "stop"
    assert text_of(other_events) == full


def test_a_cancel_stops_its_job_at_once_while_the_batch_goes_on(
    stack: Stack, vllm_worker: Service, reference: Reference
) -> None:
    victim = submit(stack.url, PROMPTS[3], MAX_LEN - 100)
    keeper = submit(stack.url, PROMPTS[4], 200)
    wait_for(lambda: view(stack, victim)["usage"]["completion_tokens"] >= 10, 60, "the victim to run")
    asked = time.monotonic()
    response = httpx.post(f"{stack.url}/v1/jobs/{victim}/cancel", timeout=30)
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    assert time.monotonic() - asked < 2.0
    tokens = view(stack, victim)["usage"]["completion_tokens"]
    time.sleep(0.5)
    assert view(stack, victim)["usage"]["completion_tokens"] == tokens  # nothing after the cancel
    assert text_of(streamed(stack, keeper)) == reference.answer(PROMPTS[4], 200)
    assert "Traceback" not in vllm_worker.log()


def test_prompt_too_long_for_the_engine_is_a_clear_400(stack: Stack, vllm_worker: Service) -> None:
    response = httpx.post(
        f"{stack.url}/v1/jobs", json={"model": MODEL, "prompt": "queue " * (MAX_LEN * 2)}, timeout=30
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages" and f"maximum context length is {MAX_LEN} tokens" in error["message"]


def test_a_killed_vllm_workers_job_continues_on_another_with_the_stream_whole(
    stack: Stack, hd64_model: Path, vllm_worker: Service, reference: Reference
) -> None:
    tokens = MAX_LEN - 200
    prompt = next(p for p in PROMPTS if len(reference.answer(p, tokens)) > 0)
    expected = reference.answer(prompt, tokens)
    second = start_vllm_worker(stack, hd64_model, "vllm-b")
    wait_for(lambda: serving(stack) == 2 or not second.alive(), 600, "the second vLLM worker")
    job_id = submit(stack.url, prompt, tokens, logprobs=2, prompt_logprobs=1)
    events: list[SSE] = []
    client = httpx.Client(timeout=300)
    reader = threading.Thread(target=lambda: events.extend(follow(client, stack.url2, job_id)))
    reader.start()
    wait_for(lambda: view(stack, job_id)["usage"]["completion_tokens"] >= 20, 60, "the job to run")
    victim = second if view(stack, job_id)["worker"].startswith("vllm-b") else vllm_worker
    if view(stack, job_id)["status"] == "finished":
        pytest.fail("the job ended before the kill; give it more tokens")
    helpers = psutil.Process(victim.proc.pid).children(recursive=True)  # vLLM's executor process
    assert helpers
    victim.proc.send_signal(signal.SIGKILL)
    reader.join(timeout=300)
    assert [e.event for e in events].count("started") == 2
    assert events[-1].event == "done"
    assert text_of(events) == expected  # no gap, no repeat
    assert view(stack, job_id)["worker"] != victim.name
    # Log probabilities: one entry per token over both runs, the prompt's once (the first run's).
    entries, usage = logprobs_of(events), events[-1].data["usage"]
    assert len(entries) == usage["completion_tokens"] and spelled(entries, reference.special()) == expected
    assert all(len(e["top_logprobs"]) == 2 for e in entries)
    (prompt_entries,) = prompt_logprobs_of(events)
    assert len(prompt_entries) == usage["prompt_tokens"]
    assert prompt_entries[0] is not None and prompt_entries[0]["logprob"] is None
    offline = reference.generate(reference.ids(prompt), tokens, logprobs=2).outputs[0]
    for entry, token, place in zip(entries, offline.token_ids, offline.logprobs, strict=False):
        assert entry["logprob"] == pytest.approx(place[token].logprob, abs=1e-3)

    def all_gone() -> bool:
        return not [p for p in helpers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    wait_for(all_gone, 30, "the killed worker's vLLM processes to exit")  # nothing left holding memory


def test_a_kv_cache_too_small_for_one_job_stops_the_worker_with_a_clear_reason(
    stack: Stack, hd64_model: Path
) -> None:
    last = refused_start(stack, hd64_model, STREAMQ_KV_CACHE_GIB="0.0001")
    assert "STREAMQ_KV_CACHE_GIB=0.0001" in last
    assert f"one job may take {MAX_LEN} (STREAMQ_MAX_SEQ_LEN)" in last
    need = float(last.split("give the KV cache at least ")[1].split(" GiB")[0])
    assert 0.0001 < need < 1, last  # what it takes, rounded up (it said 0.00)
    # Unset on a CPU, the cache is 4 GiB or half the free memory: a job longer than that holds is
    # refused the same way, naming the setting to raise.
    last = refused_start(stack, hd64_model, STREAMQ_KV_CACHE_GIB=None, STREAMQ_MAX_SEQ_LEN=str(10**9))
    assert "half the memory available" in last and "set STREAMQ_KV_CACHE_GIB" in last, last


def test_a_model_whose_head_size_vllms_cpu_attention_cannot_run_is_refused_at_start(
    stack: Stack, tiny_model: Path
) -> None:
    """The demo model's heads are 16 wide, which vLLM's CPU attention does not run: the worker
    says so when it starts, instead of becoming ready and failing every job."""
    last = refused_start(stack, tiny_model)
    assert "this model's is 16: serve it with --engine transformers" in last, last


def test_penalties_and_logit_bias_are_honoured_as_vllm_alone_honours_them(
    stack: Stack, vllm_worker: Service, reference: Reference
) -> None:
    penalties = {"presence_penalty": 1.5, "frequency_penalty": 0.8, "repetition_penalty": 1.3}
    penalized = text_of(streamed(stack, submit(stack.url, PROMPTS[0], 40, **penalties)))
    assert penalized == reference.answer(PROMPTS[0], 40, **penalties)
    assert penalized != reference.answer(PROMPTS[0], 40)  # they change the answer
    token = int(reference.prompt.tokenizer.encode(" queue", add_special_tokens=False)[0])
    biased = text_of(streamed(stack, submit(stack.url, PROMPTS[1], 6, logit_bias={str(token): 100})))
    assert biased == reference.prompt.tokenizer.decode([token] * 6)


def test_the_openai_sdk_gets_json_following_its_schema(
    stack: Stack, vllm_worker: Service, hd64_model: Path
) -> None:
    import json

    import jsonschema
    import openai

    schema = {
        "type": "object",
        # A finite language: the answer must end (a random model would fill an open integer).
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "durable": {"type": "boolean"}},
        "required": ["answer", "durable"],
        "additionalProperties": False,
    }

    def asked(content: str, response_format: Any, **fields: Any) -> Any:
        fields |= {"model": MODEL, "max_tokens": 60, "temperature": 0, "response_format": response_format}
        return client.chat.completions.create(messages=[{"role": "user", "content": content}], **fields)

    def schema_format(name: str, schema: Any) -> Any:
        return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}

    with openai.OpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0, timeout=120) as client:
        reply = asked("Is a queue durable? Answer in JSON.", schema_format("verdict", schema))
        choice = reply.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content or ""), schema)
        anything = asked("Some JSON, please.", {"type": "json_object"}, presence_penalty=0.5)
        if anything.choices[0].finish_reason == "stop":  # a random model may fill its budget
            assert isinstance(json.loads(anything.choices[0].message.content or ""), dict)
        # A schema vLLM's grammar cannot take (a Unicode class): the 400 names the field, and
        # says why without the grammar library's time and source file.
        letters = {"type": "object", "properties": {"a": {"type": "string", "pattern": "^\\p{L}+$"}}}
        with pytest.raises(openai.BadRequestError) as refused:
            asked("JSON.", schema_format("s", letters))
        body: Any = refused.value.body
        assert body["param"] == "response_format" and "Regex parsing error" in body["message"], body
        assert ".cc:" not in body["message"] and not body["message"].endswith("\n"), body
        # A keyword vLLM refuses for xgrammar (pydantic's conint(multiple_of=5)): it says only that
        # the schema has such features; the 400 says where.
        from pydantic import BaseModel, conint

        class Step(BaseModel):
            size: conint(multiple_of=5)  # type: ignore[valid-type]

        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.parse(
                model=MODEL,
                messages=[{"role": "user", "content": "JSON."}],
                response_format=Step,
                max_tokens=20,
            )
        body = refused.value.body
        assert body["param"] == "response_format", body
        assert '(at #/properties/size: {"multipleOf": 5' in body["message"], body
        # A string with a length limit: xgrammar's rule for it takes raw control characters (invalid
        # JSON), which the engine rules out, pushed as hard as a client can push them.
        bounded = {
            "type": "object",
            "properties": {"s": {"type": "string", "maxLength": 5}},
            "required": ["s"],
        }
        tab = token_of(hd64_model, "\t")
        reply = asked(
            "JSON.", schema_format("b", {**bounded, "additionalProperties": False}), logit_bias={tab: 30}
        )
        assert reply.choices[0].finish_reason == "stop", reply.choices[0].message.content
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), bounded)


def test_logprobs_of_the_answer_and_the_prompt_agree_with_vllm_alone_and_transformers(
    stack: Stack, vllm_worker: Service, reference: Reference, transformers_logprobs: Any
) -> None:
    from worker.token_logprobs import TokenTexts

    prompt, max_tokens = PROMPTS[5], 24
    events = streamed(stack, submit(stack.url, prompt, max_tokens, logprobs=3, prompt_logprobs=2))
    assert events[-1].event == "done", events[-1]
    usage, text, entries = events[-1].data["usage"], text_of(events), logprobs_of(events)
    # One entry per answer token, spelling the answer, each with the 3 most likely, most likely
    # first; greedy, the chosen token is the most likely one.
    assert len(entries) == usage["completion_tokens"] > 0
    assert spelled(entries, reference.special()) == text
    for entry in entries:
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert entry["top_logprobs"][0]["bytes"] == entry["bytes"] and top[0] == entry["logprob"]
    # The same numbers as vLLM alone gives, and as the model's full forward pass.
    ids = reference.ids(prompt)
    offline = reference.generate(ids, max_tokens, logprobs=3)
    answer = [t for t in offline.outputs[0].token_ids if t not in reference.prompt.eos_ids]
    assert reference.text(answer) == text and len(answer) == len(entries)
    rows = transformers_logprobs(ids + answer)
    texts = TokenTexts(reference.prompt.tokenizer)
    for place, (entry, token) in enumerate(zip(entries, answer, strict=True)):
        assert entry["logprob"] == pytest.approx(offline.outputs[0].logprobs[place][token].logprob, abs=1e-4)
        row = rows[len(ids) - 1 + place]
        assert entry["logprob"] == pytest.approx(float(row[token]), abs=1e-3)
        best = row.topk(3)
        assert [t["logprob"] for t in entry["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-3)
        assert [t["bytes"] for t in entry["top_logprobs"]] == [
            list(texts.token_bytes(i)) for i in best.indices
        ]
    # The prompt's: once, in the first delta event, one per prompt token, the first without any.
    (prompt_entries,) = prompt_logprobs_of(events)
    assert "prompt_logprobs" in next(e for e in events if e.event == "delta").data
    assert len(prompt_entries) == usage["prompt_tokens"] == len(ids)
    assert prompt_entries[0] is not None and prompt_entries[0]["logprob"] is None
    for place in range(1, len(ids)):
        given = prompt_entries[place]
        assert given is not None and given["bytes"] == list(texts.token_bytes(ids[place]))
        row = rows[place - 1]
        assert given["logprob"] == pytest.approx(float(row[ids[place]]), abs=1e-3)
        best = row.topk(2)
        assert [t["logprob"] for t in given["top_logprobs"]] == pytest.approx(best.values.tolist(), abs=1e-3)


def test_a_raw_prompt_as_text_or_token_ids_gives_the_same_answer_without_the_chat_template(
    stack: Stack, vllm_worker: Service, reference: Reference
) -> None:
    text = "Tell me about queues"
    ids = list(reference.prompt.tokenizer(text, add_special_tokens=True)["input_ids"])
    jobs = [
        submit(stack.url, None, 16, raw_prompt=text),
        submit(stack.url, None, 16, raw_prompt=ids),
        submit(stack.url, text, 16),  # the same words as a chat turn
    ]
    as_text, as_ids, chat = (streamed(stack, job_id) for job_id in jobs)
    answer = [
        t for t in reference.generate(ids, 16).outputs[0].token_ids if t not in reference.prompt.eos_ids
    ]
    assert answer and text_of(as_text) == text_of(as_ids) == reference.text(answer)
    assert as_text[-1].data["usage"]["prompt_tokens"] == as_ids[-1].data["usage"]["prompt_tokens"] == len(ids)
    assert text_of(chat) == reference.answer(text, 16) != text_of(as_text)
    assert chat[-1].data["usage"]["prompt_tokens"] > len(ids)
    # Token ids past the model's vocabulary (as the vLLM worker says it): a 400, and no job.
    body = {"model": MODEL, "max_tokens": 4, "raw_prompt": [5, 10**6]}
    refused = httpx.post(f"{stack.url}/v1/jobs", json=body, timeout=30)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "raw_prompt", refused.text
    last = len(reference.prompt.tokenizer) - 1
    assert f"token id 1000000 is not in this model's vocabulary (0 to {last})" in refused.text


def test_tools_go_through_the_chat_template(stack: Stack, vllm_worker: Service, reference: Reference) -> None:
    from shared.schemas import ToolDefinition

    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    with_tools = streamed(stack, submit(stack.url, None, 12, messages=messages, tools=tools))
    without = streamed(stack, submit(stack.url, None, 12, messages=messages))
    assert with_tools[-1].event == without[-1].event == "done"
    rendered = reference.prompt.encode(
        PromptInput(messages=[ChatMessage(**m) for m in messages], tools=[ToolDefinition(**t) for t in tools])
    )
    assert "<tools>" in reference.prompt.tokenizer.decode(rendered)
    tokens = with_tools[-1].data["usage"]["prompt_tokens"]
    assert tokens == len(rendered) > without[-1].data["usage"]["prompt_tokens"]
    answer = [
        t for t in reference.generate(rendered, 12).outputs[0].token_ids if t not in reference.prompt.eos_ids
    ]
    assert text_of(with_tools) == reference.text(answer)
