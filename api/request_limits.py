"""A job request resolved against the server's defaults and limits, before any job exists.

Every limit refused here is a 400 whose message names the limit and the setting that holds it
(the body size is checked earlier, as a 413, by ``api.body_limit``; the prompt's token count,
which needs the model's tokenizer, by ``JobService``)."""

from __future__ import annotations

from typing import Any

from api.errors import ApiError
from api.strict_tools import ANY_OBJECT, calls_or_json_grammar, strict_calls_grammar
from shared.schemas import ChatMessage, GenerationRequest, JobRequest, ResponseFormat
from shared.settings import Settings


def _refuse(message: str, setting: str, param: str) -> ApiError:
    return ApiError(400, f"{message} (STREAMQ_{setting.upper()})", param=param, code="limit_exceeded")


def stop_sequences(request: JobRequest) -> list[str]:
    return [request.stop] if isinstance(request.stop, str) else list(request.stop or [])


def check_limits(
    request: JobRequest, messages: list[ChatMessage], stop: list[str], settings: Settings
) -> None:
    """The request (its conversation as ``messages``, its ``stop`` as a list) against the server's
    limits: messages, prompt characters, stop sequences, max_tokens and the job's lifetimes. The
    earlier turns a Responses chain carries count toward none of them (they did when they were
    sent): a chain is bounded by the model's context alone, as OpenAI's are."""
    s = settings
    carried_messages, carried_chars = request.carried
    conversation = "messages" if request.messages is not None else "history"
    if request.raw_prompt is not None:
        size = len(request.raw_prompt)
        if size > s.max_prompt_chars:
            raise _refuse(
                f"the prompt is {size} {'characters' if isinstance(request.raw_prompt, str) else 'tokens'}"
                f" long, at most {s.max_prompt_chars} are allowed",
                "max_prompt_chars",
                "raw_prompt",
            )
    count = len(messages) - carried_messages
    if count > s.max_messages:
        raise _refuse(
            f"{conversation}: {count} messages, at most {s.max_messages} are allowed",
            "max_messages",
            conversation,
        )
    chars = sum(len(m.content) for m in messages) + sum(len(t.model_dump_json()) for t in request.tools or [])
    chars -= carried_chars
    if chars > s.max_prompt_chars:
        raise _refuse(
            f"the prompt is {chars} characters long, at most {s.max_prompt_chars} are allowed",
            "max_prompt_chars",
            "messages" if request.messages is not None else "prompt",
        )
    if len(stop) > s.max_stop_sequences:
        raise _refuse(
            f"stop: {len(stop)} sequences, at most {s.max_stop_sequences} are allowed",
            "max_stop_sequences",
            "stop",
        )
    longest = max((len(item) for item in stop), default=0)
    if longest > s.max_stop_chars:
        raise _refuse(
            f"stop: a sequence is {longest} characters long, at most {s.max_stop_chars} are allowed",
            "max_stop_chars",
            "stop",
        )
    if request.max_tokens is not None and request.max_tokens > s.max_tokens_limit:
        raise _refuse(
            f"'max_tokens' must be at most {s.max_tokens_limit}, got {request.max_tokens}",
            "max_tokens_limit",
            "max_tokens",
        )
    for name, value, limit, setting in (
        ("queue_ttl", request.queue_ttl, s.queue_ttl, "queue_ttl"),
        ("timeout", request.timeout, s.job_timeout, "job_timeout"),
    ):
        if value is not None and value > limit:
            raise _refuse(f"'{name}' must be at most {limit} seconds, got {value}", setting, name)


def generation_request(request: JobRequest, settings: Settings) -> GenerationRequest:
    """The request within the server's limits (or a 400), with the server's defaults filled in."""
    messages, stop = request.chat_messages(), stop_sequences(request)
    check_limits(request, messages, stop, settings)
    s = settings
    if request.max_tokens is not None:
        max_tokens = request.max_tokens
    elif request.max_length is not None:  # ChatGLM style: max_length bounds the answer
        max_tokens = s.max_tokens_limit
    else:
        max_tokens = s.default_max_tokens
    raw = request.raw_prompt
    return GenerationRequest(
        messages=messages,
        tools=request.tools or None,
        text=raw if isinstance(raw, str) else None,
        token_ids=raw if isinstance(raw, list) else None,
        logprobs=request.logprobs,
        prompt_logprobs=request.prompt_logprobs,
        max_tokens=max_tokens,
        max_tokens_given=request.max_tokens is not None,
        max_length=request.max_length,
        temperature=1.0 if request.temperature is None else request.temperature,
        # top_p 0, a nucleus of no probability: as OpenAI takes it, the most likely token only.
        # Said as top_k 1, which every engine takes (vLLM and transformers refuse a top_p of 0).
        top_p=1.0 if not request.top_p else request.top_p,
        top_k=1 if request.top_p == 0 else request.top_k or 0,
        stop=stop,
        seed=None if request.seed is None else request.seed % 2**64,  # the engines' unsigned seed
        queue_ttl=request.queue_ttl,
        timeout=request.timeout,
        max_prompt_tokens=s.max_prompt_tokens,
        presence_penalty=request.presence_penalty or 0.0,
        frequency_penalty=request.frequency_penalty or 0.0,
        repetition_penalty=request.repetition_penalty or 1.0,
        logit_bias={int(token): bias for token, bias in (request.logit_bias or {}).items()},
        **answer_grammar(request),
    )


def answer_grammar(request: JobRequest) -> dict[str, Any]:
    """The job's grammar fields: a JSON answer (``response_format``, or the call that tool_choice
    forces), tools beside a JSON answer (calls or the JSON: one structural tag), or calls held
    to strict functions in a free answer (a structural tag where any function is strict)."""
    json_answer = structured_output(request.response_format)
    if json_answer and request.tools and not request.forced_call:
        schema = json_answer.get("json_schema", ANY_OBJECT)
        return {"structural_tag": calls_or_json_grammar(request.tools, schema)}
    return json_answer or {"structural_tag": strict_calls_grammar(request.tools)}


def structured_output(response_format: ResponseFormat | None) -> dict[str, Any]:
    """The job's structured-output fields from OpenAI's ``response_format``."""
    if response_format is None or response_format.type == "text":
        return {}
    if response_format.json_schema is not None:
        return {"json_schema": response_format.json_schema.schema_}
    return {"json_object": True}


def check_token_ids(request: GenerationRequest, vocab_size: int | None) -> None:
    """A 400 naming the field when a token id (of ``logit_bias``, or of a prompt given as token
    ids) is outside the ids the model's workers take (0 to ``vocab_size`` - 1): refused before the
    job is made, not failed by its worker. Nothing is checked when no live worker says its size."""
    if vocab_size is None:
        return
    for param, ids in (("logit_bias", request.logit_bias), ("raw_prompt", request.token_ids or ())):
        bad = next((token for token in ids if not 0 <= token < vocab_size), None)
        if bad is not None:
            raise ApiError(
                400, f"token id {bad} is not in this model's vocabulary (0 to {vocab_size - 1})", param=param
            )
