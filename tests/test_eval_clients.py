"""lm-evaluation-harness and LiteLLM against the real stack, as their users run them: lm-eval's
``local-completions`` model scores loglikelihood requests through ``/v1/completions`` (token-id
prompts, ``echo`` + ``logprobs``) and generates; LiteLLM's ``openai/`` provider calls tools and
asks for JSON. lm-eval's scores are checked against the model's own full forward pass."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from tests.conftest import Stack

pytestmark = pytest.mark.e2e

PAIRS = [
    ("The quick brown", " fox jumps over"),
    ("Redis streams carry each", " job's output"),
    ("你好", "，世界"),
]


def reference_loglikelihood(backend: Any, context: str, continuation: str) -> tuple[float, bool]:
    """lm-eval's split (the whole text encoded, the context's tokens first), scored by one
    forward pass of the worker's own model."""
    tokenizer = backend.tokenizer
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    with torch.inference_mode():
        logits = backend.model(input_ids=torch.tensor([whole])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    total, greedy = 0.0, True
    for position in range(n_context, len(whole)):
        row = logprobs[position - 1]
        total += float(row[whole[position]])
        greedy = greedy and int(row.argmax()) == whole[position]
    return total, greedy


@pytest.mark.parametrize("batch_size", [1, 3])
def test_lm_eval_local_completions_scores_as_the_model_does(
    stack: Stack, tiny_backend: Any, batch_size: int
) -> None:
    """batch_size 3 sends the three pairs as one request, a list of prompts (lm-eval's README
    runs local-completions with batch_size=16): they were a 400."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    lm = LocalCompletionsAPI(
        base_url=f"{stack.url}/v1/completions",
        model=stack.model_dir.name,
        tokenizer_backend="huggingface",
        tokenizer=str(stack.model_dir),
        max_retries=1,
        batch_size=batch_size,
    )
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(PAIRS)]
    scores = lm.loglikelihood(requests)
    for (context, continuation), (score, greedy) in zip(PAIRS, scores, strict=True):
        expected, expected_greedy = reference_loglikelihood(tiny_backend, context, continuation)
        assert score == pytest.approx(expected, abs=2e-3), (context, score, expected)
        assert greedy == expected_greedy

    contexts = ["Once upon a time", "Redis streams", "你好"]
    asked = {"until": ["\n\n"], "max_gen_toks": 6}
    generated = lm.generate_until(
        [Instance("generate_until", {}, (c, asked), i) for i, c in enumerate(contexts)]
    )
    assert len(generated) == 3 and all(isinstance(text, str) and text for text in generated)


def test_an_answer_that_is_an_end_of_sequence_keeps_its_entry_for_lm_eval(
    stack: Stack, tiny_backend: Any
) -> None:
    """lm-eval's loglikelihood asks for one token after the echoed text and drops its entry
    (``token_logprobs[ctxlen:-1]``): where the model's next token is its end of sequence, the
    answer had no entry, so lm-eval dropped the continuation's last token instead (scored 0.0,
    "greedy"). The end's entry is there, named, and counted, as vLLM gives it."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from tests.conftest import openai_client

    tokenizer = tiny_backend.tokenizer
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    context, continuation = PAIRS[1]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    answer = openai_client(stack.url).completions.create(
        model=stack.model_dir.name,
        prompt=whole,
        echo=True,
        logprobs=1,
        max_tokens=1,
        temperature=0,
        logit_bias={str(eos): 100},  # the next token is the end, whatever this random model says
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and answer.usage is not None and answer.usage.completion_tokens == 1
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert len(choice.logprobs.tokens) == len(whole) + 1 and choice.logprobs.tokens[-1] == "<|im_end|>"
    ((score, greedy),) = LocalCompletionsAPI.parse_logprobs(answer.model_dump(), ctxlens=[n_context])
    expected, expected_greedy = reference_loglikelihood(tiny_backend, context, continuation)
    assert score == pytest.approx(expected, abs=2e-3) and greedy == expected_greedy
    with torch.inference_mode():  # the end's own entry: its raw log probability, before the bias
        logits = tiny_backend.model(input_ids=torch.tensor([whole])).logits[0, -1].float()
    raw = float(torch.log_softmax(logits, dim=-1)[eos])
    assert choice.logprobs.token_logprobs is not None
    assert choice.logprobs.token_logprobs[-1] == pytest.approx(raw, abs=2e-3)


def test_litellm_calls_a_tool_and_answers_json(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network here: its bundled copy
    import litellm
    from litellm.exceptions import ContextWindowExceededError

    tool = {
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": {
                "type": "object",
                "properties": {"term": {"type": "string", "maxLength": 12}},
                "required": ["term"],
                "additionalProperties": False,
            },
        },
    }
    common: dict[str, Any] = {
        "model": f"openai/{stack.model_dir.name}",
        "api_base": f"{stack.url}/v1",
        "api_key": "x",
        "max_tokens": 60,
    }
    called = litellm.completion(
        messages=[{"role": "user", "content": "Look up queues."}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "lookup"}},
        **common,
    )
    call = called.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup" and isinstance(json.loads(call.function.arguments)["term"], str)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "size": {"enum": ["small", "large"]}},
        "required": ["ok", "size"],
        "additionalProperties": False,
    }
    answered = litellm.completion(
        messages=[{"role": "user", "content": "Give JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}},
        **common,
    )
    assert json.loads(answered.choices[0].message.content)["size"] in ("small", "large")
    # An answer that cannot fit beside the prompt is LiteLLM's own context error (its fallbacks
    # to a model with a longer context key on it), not a cut answer.
    with pytest.raises(ContextWindowExceededError):
        litellm.completion(messages=[{"role": "user", "content": "Hi."}], **common | {"max_tokens": 4096})
