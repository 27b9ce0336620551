"""The model path on the tiny model: loading, chat template, sampling settings, limits, stop."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import pytest

from harness.redis_server import RedisServer
from shared.limits import InvalidJobRequest
from shared.schemas import ChatMessage, GenerationRequest, PromptInput
from tests.engine_driving import request as engine_request


def request(prompt: str = "Tell me about Redis", **overrides: Any) -> GenerationRequest:
    return engine_request(prompt, **({"max_tokens": 24} | overrides))


def run(backend: Any, req: GenerationRequest) -> tuple[str, str | None, int]:
    steps = list(backend.generate(req))
    return "".join(s.delta for s in steps), steps[-1].finish_reason, steps[-1].completion_tokens


def test_the_tiny_model_folder_loads_with_the_auto_classes(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.config.model_type == "qwen2"
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_the_prompt_is_built_with_the_chat_template(tiny_backend: Any) -> None:
    ids = tiny_backend.encode(
        PromptInput(
            messages=[ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="hi")]
        )
    )
    assert tiny_backend.tokenizer.decode(ids) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_a_conversation_may_end_with_an_assistant_or_system_turn(tiny_backend: Any) -> None:
    """As OpenAI and vLLM take it: the model answers in a new assistant turn after it."""
    for last in (ChatMessage(role="assistant", content="hello"), ChatMessage(role="system", content="hey")):
        ids = tiny_backend.encode(PromptInput(messages=[ChatMessage(role="user", content="hi"), last]))
        assert tiny_backend.tokenizer.decode(ids) == (
            f"<|im_start|>user\nhi<|im_end|>\n<|im_start|>{last.role}\n{last.content}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )


def test_a_conversation_the_chat_template_refuses_is_a_bad_request_naming_messages(tiny_backend: Any) -> None:
    """A template's own check (Llama-style "roles must alternate") is about the request, not a
    failure of the model: a 400 naming ``messages`` with the template's words."""
    import copy

    from worker.chatglm import to_query_and_history

    tokenizer = copy.deepcopy(tiny_backend.tokenizer)
    tokenizer.chat_template = (
        "{%- if messages[-1]['role'] != 'user' %}{{ raise_exception('roles must alternate') }}{%- endif %}"
        "{%- for m in messages %}{{ m['content'] }}{%- endfor %}"
    )
    ending_with_the_assistant = PromptInput(
        messages=[ChatMessage(role="user", content="hi"), ChatMessage(role="assistant", content="hello")]
    )
    with pytest.raises(InvalidJobRequest) as refused:
        tiny_backend.encode(ending_with_the_assistant, tokenizer)
    assert refused.value.param == "messages" and "roles must alternate" in str(refused.value)
    # ChatGLM's stream_chat is asked a question: a conversation must end with the user's turn.
    with pytest.raises(InvalidJobRequest) as refused:
        to_query_and_history(ending_with_the_assistant.messages)
    assert refused.value.param == "messages" and "user" in str(refused.value)
    system_last = [ChatMessage(role="user", content="hi"), ChatMessage(role="system", content="x")]
    assert to_query_and_history(system_last) == ("x\n\nhi", [])


def test_greedy_is_repeatable_and_prompts_give_different_answers(tiny_backend: Any) -> None:
    first = run(tiny_backend, request("alpha"))
    assert first == run(tiny_backend, request("alpha"))
    assert first[0] != run(tiny_backend, request("beta"))[0]


def test_a_seed_makes_sampling_repeatable(tiny_backend: Any) -> None:
    seeded = request(temperature=1.0, top_p=0.95, seed=11, max_tokens=16)
    assert run(tiny_backend, seeded) == run(tiny_backend, seeded)
    others = {run(tiny_backend, seeded.model_copy(update={"seed": s}))[0] for s in range(12, 18)}
    assert len(others) > 1


def test_max_tokens_and_max_length_bound_the_answer(tiny_backend: Any) -> None:
    _text, reason, tokens = run(tiny_backend, request(max_tokens=7))
    assert (reason, tokens) == ("length", 7)
    prompt_tokens = len(tiny_backend.encode(request()))
    _, reason, tokens = run(tiny_backend, request(max_tokens=100, max_length=prompt_tokens + 5))
    assert (reason, tokens) == ("length", 5)


def test_max_length_not_above_the_prompt_is_refused(tiny_backend: Any) -> None:
    prompt_tokens = len(tiny_backend.encode(request()))
    with pytest.raises(InvalidJobRequest, match=f"max_length \\({prompt_tokens}\\) must be greater"):
        run(tiny_backend, request(max_length=prompt_tokens))


def test_a_stop_sequence_ends_the_answer_before_it(tiny_backend: Any) -> None:
    full, _, _ = run(tiny_backend, request(max_tokens=40))
    stop = full[10:13]
    assert len(stop.strip()) > 0
    text, reason, _ = run(tiny_backend, request(max_tokens=40, stop=[stop]))
    assert reason == "stop"
    assert text == full[: full.index(stop)]


def test_a_conversation_is_answered_token_by_token_from_all_its_turns(tiny_backend: Any) -> None:
    from worker.chatglm import to_query_and_history

    turns = [
        ChatMessage(role="user", content="hi"),
        ChatMessage(role="assistant", content="hello"),
        ChatMessage(role="user", content="and then?"),
    ]
    assert to_query_and_history(turns) == ("and then?", [("hi", "hello")])  # ChatGLM's view of it
    conversation = request(messages=turns, max_tokens=60, max_length=60, top_p=0.7, temperature=0)
    steps = list(tiny_backend.generate(conversation))
    answers = list(itertools.accumulate(s.delta for s in steps))  # the answer so far, step by step
    assert len(answers) > 1 and answers[-1].strip()
    assert [s.completion_tokens for s in steps] == list(range(1, len(steps) + 1))  # a token a step
    last_turn_alone = request(messages=turns[-1:], max_tokens=60, max_length=60, top_p=0.7, temperature=0)
    assert answers[-1] != run(tiny_backend, last_turn_alone)[0]  # the earlier turns shape the answer


def test_a_chatglm_models_stream_chat_is_given_top_k(tiny_backend: Any) -> None:
    """top_k (and top_p 0, taken as top_k 1: the most likely token) reaches a ChatGLM model
    through the keyword arguments its stream_chat hands on to generate; it was dropped."""
    from types import SimpleNamespace

    from worker.chatglm import ChatGLMChat

    class OwnStreamChat:  # the one method, and config, ChatGLMChat uses of a ChatGLM model
        config = SimpleNamespace(seq_length=512)

        def __init__(self) -> None:
            self.asked: list[dict[str, Any]] = []

        def stream_chat(self, tokenizer: Any, query: str, history: Any, **kwargs: Any) -> Any:
            self.asked.append(kwargs)
            yield "an answer", history

    model = OwnStreamChat()
    glm = ChatGLMChat(model, tiny_backend.tokenizer, "glm", "cpu", "float32")
    samplings: list[dict[str, Any]] = [
        {"top_k": 5, "temperature": 0.8},
        {"top_k": 1, "temperature": 0.8},
        {"temperature": 0.8},
    ]
    for sampling in samplings:
        assert "".join(step.delta for step in glm.generate(request(**sampling))) == "an answer"
    assert [(a.get("top_k"), a["do_sample"]) for a in model.asked] == [(5, True), (1, False), (None, True)]


def test_device_and_dtype_choice() -> None:
    from worker.model_loading import default_served_name, resolve_device, resolve_dtype

    assert resolve_device("cpu") == "cpu"
    assert resolve_dtype("auto", "cpu") == "float32"
    with pytest.raises(ValueError, match="device must be one of"):
        resolve_device("tpu")
    assert default_served_name("Qwen/Qwen2.5-0.5B-Instruct") == "Qwen/Qwen2.5-0.5B-Instruct"


def test_the_prompt_counter_answers_with_the_models_own_count(
    tiny_backend: Any, redis_server: RedisServer
) -> None:
    """A front's question on Redis (a request pushed on the model's list), answered on the reply
    list it names, with the count of the model's own tokenizer and chat template."""
    import json

    from shared import keys
    from worker.prompt_counter import PromptCounter

    r = redis_server.client()
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]
    expected = len(tiny_backend.encode(PromptInput(messages=[ChatMessage(**m) for m in messages])))

    def asked(counter: PromptCounter, reply: str) -> dict[str, Any]:
        counter.start()
        try:
            r.lpush(keys.count_requests(tiny_backend.name), b"not json")  # skipped, not fatal
            r.lpush(
                keys.count_requests(tiny_backend.name),
                json.dumps({"reply": reply, "prompt": {"messages": messages}}),
            )
            answered = r.brpop([reply], timeout=30)
        finally:
            counter.stop()
        assert answered is not None, "no answer from the prompt counter"
        assert r.ttl(reply) > 0 or r.exists(reply) == 0
        return dict(json.loads(answered[1]))

    assert asked(PromptCounter(r, tiny_backend), "reply:r1") == {
        "prompt_tokens": expected,
        "context_length": 4096,
    }
    # A worker whose engine holds less per job (STREAMQ_MAX_SEQ_LEN) says so: the front's check
    # is then the one the worker applies (the model's own context let through what it refused).
    assert asked(PromptCounter(r, tiny_backend, 512), "reply:r2")["context_length"] == 512


def test_the_front_asks_for_a_count_only_when_the_prompt_might_not_fit() -> None:
    from shared.limits import may_not_fit

    short = request("hello")
    assert not may_not_fit(short, 4096)
    assert may_not_fit(request("hello", max_length=100), 4096)
    assert may_not_fit(request("x" * 4000), 4096)
    assert not may_not_fit(request("x" * 4000), None)
    # A max_tokens the client set must fit beside the prompt: counted when it might not.
    assert may_not_fit(request("hello", max_tokens=4000, max_tokens_given=True), 4096)
    assert not may_not_fit(request("hello", max_tokens=3000, max_tokens_given=True), 4096)
    assert not may_not_fit(request("hello", max_tokens=4000), 4096)  # a default is cut instead


def test_a_max_tokens_the_client_set_must_fit_the_context_and_a_default_is_cut() -> None:
    from shared.limits import InvalidJobRequest, answer_budget

    with pytest.raises(InvalidJobRequest) as refused:
        answer_budget(request(max_tokens=4000, max_tokens_given=True), 100, 4096)
    assert refused.value.param == "max_tokens" and refused.value.code == "context_length_exceeded"
    assert str(refused.value).startswith(
        "This model's maximum context length is 4096 tokens. However, you requested 4100 tokens "
        "(100 in the messages, 4000 in the completion)."
    )
    assert answer_budget(request(max_tokens=3996, max_tokens_given=True), 100, 4096) == 3996
    assert answer_budget(request(max_tokens=4000), 100, 4096) == 3996  # the server's default, cut


def test_the_worker_refuses_a_prompt_over_the_servers_token_limit(tiny_backend: Any) -> None:
    """When no worker counted the prompt in time, the worker that takes the job applies the
    front's STREAMQ_MAX_PROMPT_TOKENS (carried in the job) with its own tokenizer."""
    from shared.limits import InvalidJobRequest, may_not_fit

    over = request("word " * 60, max_prompt_tokens=40)
    assert may_not_fit(over, None), "a prompt that may pass the limit is counted by the front"
    with pytest.raises(InvalidJobRequest, match="STREAMQ_MAX_PROMPT_TOKENS"):
        list(tiny_backend.generate(over))
    within = request("word", max_prompt_tokens=40)
    assert list(tiny_backend.generate(within))[-1].finish_reason in ("stop", "length")
