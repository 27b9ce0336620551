"""vLLM as the worker's engine: vLLM's ``LLMEngine`` in process, driven step by step by streamq's
engine thread exactly like the transformers engine (``BatchModel``: add, remove, step).

What stays streamq's, so that both engines give the same stream for the same tokens:

- the prompt is rendered and counted with the model's own tokenizer and chat template
  (``ChatPrompt``) and handed to vLLM as token ids; a continued job's prompt is the prompt
  plus the tokens an earlier run generated;
- generated token ids come back from vLLM as deltas and go through ``AnswerTokens``: text
  deltas, stop sequences, end of sequence and the answer's budget (a job that stops on a stop
  sequence is aborted in vLLM at once);
- a cancel, a deadline or a lost lease removes the job between two engine steps, which aborts
  its request in vLLM before the next one;
- log probabilities: vLLM computes them (the model's raw distribution, its ``raw_logprobs``), and
  they are turned into entries here by token id (``TokenTexts``), one per token the answer took:
  none for an end-of-sequence token, nor for tokens past a stop sequence.

vLLM does the rest: scheduling, paged KV cache, sampling (temperature, top_p, top_k, seed),
penalties, logit bias, grammar-constrained JSON. ``worker.vllm_setup`` starts the engine.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from shared.limits import InvalidJobRequest
from shared.logprobs import TokenLogprob
from shared.schemas import ENGINE_FEATURES, TOOLS, GenerationRequest
from shared.tool_call_format import CLOSE, OPEN
from worker.answer_tokens import AnswerTokens
from worker.chat_prompt import PromptRenderer
from worker.engine import CannotContinue, EngineJob, JobOutput, resume
from worker.logits_rules import library_reason, refused_field
from worker.row_failures import RowFailed, grammar_not_built, no_way_on
from worker.token_logprobs import TokenTexts

if TYPE_CHECKING:
    from worker.vllm_setup import VLLMServed


@dataclass(eq=False)
class _Request:
    job: EngineJob
    request_id: str
    answer: AnswerTokens
    prompt_logprobs: bool = False  # still to send with the job's first output


def _logprob_entry(texts: TokenTexts, token_id: int, position: Mapping[int, Any], k: int) -> TokenLogprob:
    """The entry of ``token_id`` from vLLM's log probabilities at its place: a dict of token id →
    ``Logprob`` holding the token itself (inserted first) and the ``k`` most likely tokens (in
    order of rank). When the token is one of those k, the dict holds k entries, its own with its
    place among them as its rank."""
    items = list(position.items())
    # Not among the k most likely: they follow it, most likely first; among them: by rank.
    alternatives = items[1:] if len(items) > k else sorted(items, key=lambda item: item[1].rank or 0)
    chosen = position[token_id].logprob
    return texts.entry(token_id, chosen, [(i, lp.logprob) for i, lp in alternatives[:k]])


class VLLMModel:
    """vLLM's engine behind the ``BatchModel`` interface that streamq's engine thread drives."""

    engine = "vllm"

    def __init__(self, engine: Any, served: VLLMServed, slots: int, max_len: int) -> None:
        self.vllm = engine  # vLLM's LLMEngine
        self.served = served
        self.slots = slots
        self.max_len = max_len
        # Tools only where the chat template renders them, with calls streamq can parse.
        self.features = ENGINE_FEATURES if served.takes_tools() else ENGINE_FEATURES - {TOOLS}
        vocab_size = int(engine.vllm_config.model_config.get_vocab_size())
        self.vocab_size = vocab_size  # the ids vLLM takes in prompts and logit biases: the model's
        self.texts = TokenTexts(served.tokenizer, vocab_size).warm()  # log probabilities' entries
        self._renderer = PromptRenderer(served)
        self._held: dict[EngineJob, _Request] = {}
        self._by_id: dict[str, _Request] = {}
        self._ids = itertools.count()

    def prepare(self, job: EngineJob) -> None:
        """Render the job's prompt in the calling (job) thread."""
        job.prompt_ids, job.prompt_error = self._renderer.render(job.request)

    def add(self, job: EngineJob) -> None:
        from vllm import TokensPrompt

        prompt = job.rendered_prompt()
        if prompt is None:
            prompt = self.served.encode(job.request)
        answer = self.served.answer(job.request, len(prompt), self.max_len)
        job.prompt_tokens = len(prompt)
        resume(job, answer)  # continue an earlier run, if there was one
        if job.resume_ids:
            check_continuable(job.request, self.served.tokenizer.decode(job.resume_ids))
        # A continued job's prompt log probabilities went out with its earlier run's first output.
        prompt_logprobs = job.request.prompt_logprobs is not None and not job.resume_ids
        request_id = f"{job.job_id}-{job.run or 'local'}-{next(self._ids)}"
        try:
            params = self.sampling(job.request, answer.budget - answer.completion_tokens, prompt_logprobs)
            self.vllm.add_request(request_id, TokensPrompt(prompt_token_ids=prompt + job.resume_ids), params)
        except refusals() as exc:  # vLLM's own checks: a token id out of its vocabulary, a bad schema
            grammar = refused_field(job.request)
            param = grammar if grammar and _about_the_grammar(str(exc)) else None
            reason = library_reason(str(exc)) or type(exc).__name__  # no grammar library's time and source
            if param and job.request.json_schema is not None:
                reason += unsupported_place(job.request.json_schema)
            raise InvalidJobRequest(f"the vLLM engine refused the request: {reason}", param) from exc
        held = _Request(job, request_id, answer, prompt_logprobs)
        self._held[job] = held
        self._by_id[request_id] = held

    def sampling(self, request: GenerationRequest, max_tokens: int, prompt_logprobs: bool = True) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from worker.vllm_json_mask import CALLS, JSON_MASK

        grammar = structured_outputs(request)
        return SamplingParams(
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            # vLLM seeds its own generator for the request once and draws a vocabulary's worth of
            # noise from it per step, out of streamq's reach: a continued job (prompt + earlier
            # tokens) starts that stream over, so its draws differ from the interrupted run's;
            # with a seed, each continuation from the same tokens draws the same noise.
            # An unseeded job keeps vLLM's shared generator (seeded requests sample one by one).
            seed=request.seed,
            presence_penalty=request.presence_penalty,
            frequency_penalty=request.frequency_penalty,
            repetition_penalty=request.repetition_penalty,
            logit_bias=dict(request.logit_bias) or None,
            structured_outputs=grammar,
            # Beside the grammar, the tokens the transformers engine masks too: xgrammar's rule
            # for a string with a length limit takes raw control characters (invalid JSON).
            extra_args={JSON_MASK: CALLS if request.structural_tag and not request.json_or_calls() else True}
            if grammar is not None
            else None,
            logprobs=request.logprobs,
            prompt_logprobs=request.prompt_logprobs if prompt_logprobs else None,
            max_tokens=max_tokens,
            stop_token_ids=sorted(self.served.eos_ids),
            detokenize=False,  # streamq decodes (AnswerTokens): stop sequences, held-back bytes
            output_kind=RequestOutputKind.DELTA,
        )

    def remove(self, job: EngineJob) -> None:
        held = self._held.pop(job, None)
        if held is not None:
            self._by_id.pop(held.request_id, None)
            self.vllm.abort_request([held.request_id])

    def ready_in(self) -> float | None:
        return 0.0 if self._held else None

    def step(self) -> list[JobOutput]:
        outputs: list[JobOutput] = []
        done: list[_Request] = []
        for result in self.vllm.step():
            held = self._by_id.get(result.request_id)
            if held is None:  # aborted since it was scheduled
                continue
            completion = result.outputs[0]
            answer = held.answer
            job = held.job
            k = job.request.logprobs
            before = len(answer.token_ids)
            text = ""
            logprobs: list[TokenLogprob] = []
            # vLLM ends a JSON request whose grammar refused the token it took (its mask left
            # none) with "error", that token last among the new ones: it is not the answer's.
            errored = result.finished and completion.finish_reason == "error"
            refused = bool(errored and job.request.grammar_field() and completion.token_ids)
            taken = list(completion.token_ids)[: -1 if refused else None]
            for place, token in enumerate(taken):
                text += answer.push(token)
                if k is not None:  # an end of sequence too: lm-eval reads the last token's entry
                    logprobs.append(_logprob_entry(self.texts, token, completion.logprobs[place], k))
                if answer.finish_reason is not None:
                    break
            failure: RowFailed | None = None
            if result.finished and answer.finish_reason is None:
                # vLLM's own end of a request it could not go on with (a grammar that refused a
                # token or failed to compile, an error in its engine): the job fails, not "stop".
                if refused:
                    start = self.texts.token_bytes(answer.token_ids[0]) if answer.token_ids else None
                    field = job.request.grammar_field(start) or "response_format"
                    failure = no_way_on(len(answer.token_ids), field)
                elif errored and not answer.token_ids and (built := refused_field(job.request)):
                    failure = grammar_not_built(built)  # before a token: its grammar, not built
                elif completion.finish_reason in ("abort", "error"):
                    failure = RowFailed(
                        "generation_error", f"the vLLM engine ended the request ({completion.finish_reason})"
                    )
                text += answer.end("length" if completion.finish_reason == "length" else "stop")
            job.completion_tokens = answer.completion_tokens
            new_ids = tuple(answer.token_ids[before:])
            outputs.append(
                JobOutput(
                    job,
                    text,
                    job.prompt_tokens,
                    job.completion_tokens,
                    "error" if failure else answer.finish_reason,
                    failure.error_type if failure else "",
                    str(failure or ""),
                    failure.param if failure else None,
                    token_ids=new_ids,
                    logprobs=tuple(logprobs),
                    prompt_logprobs=self._prompt_logprobs(held, result),
                )
            )
            if answer.finish_reason is not None:
                done.append(held)
                if not result.finished:  # a stop sequence: vLLM would go on
                    self.vllm.abort_request([held.request_id])
        for held in done:
            self._held.pop(held.job, None)
            self._by_id.pop(held.request_id, None)
        return outputs

    def _prompt_logprobs(self, held: _Request, result: Any) -> tuple[TokenLogprob, ...] | None:
        """The prompt's entries, on the job's first output only (vLLM gives them all at once,
        after the prompt's last prefill chunk): the first token has no logprob (None)."""
        positions = result.prompt_logprobs
        if not held.prompt_logprobs or not positions:
            return None
        held.prompt_logprobs = False
        k = held.job.request.prompt_logprobs or 0
        return tuple(
            self.texts.entry(token, None, [])
            if position is None
            else _logprob_entry(self.texts, token, position, k)
            for token, position in zip(result.prompt_token_ids, positions, strict=True)
        )


def check_continuable(request: GenerationRequest, answered: str) -> None:
    """CannotContinue for a job this engine cannot continue from its earlier run's tokens: a JSON
    answer (``response_format``, a call that ``tool_choice`` forces, or calls or JSON where tools
    go beside it), or one stopped inside a strict call. vLLM hands those tokens to the model as
    prompt, and its grammar starts from the beginning of the answer, so the continuation would
    begin a second JSON value mid-answer. (The transformers engine replays them through the
    grammar.)"""
    if (
        request.json_schema is not None
        or request.json_object
        or (request.json_or_calls() is not None and answered != "")
        or _inside_a_call(request, answered)
    ):
        raise CannotContinue(
            "its worker stopped mid-answer, and the vLLM engine cannot continue a JSON answer or a "
            "strict call (its grammar would start again mid-answer): send the request again"
        )


def _inside_a_call(request: GenerationRequest, answered: str) -> bool:
    """Whether ``answered`` (the answer so far) stops inside a strict call, or where one may be
    beginning: the calls' grammar, started again, would hold the rest of it no more. Between calls
    (text, or after a whole call) it starts where it was."""
    if request.structural_tag is None:
        return False
    opened, closed = answered.rfind(OPEN), answered.rfind(CLOSE)
    return opened > closed or any(answered.endswith(OPEN[:n]) for n in range(1, len(OPEN)))


def refusals() -> tuple[type[Exception], ...]:
    """The errors vLLM raises for a request it will not take: ValueError, and its own client
    errors (``VLLMValidationError``: a token id out of its vocabulary), which are not ValueErrors."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # a vLLM before its own error classes
        return (ValueError,)
    return (ValueError, VLLMClientError)


def structured_outputs(request: GenerationRequest) -> Any:
    """vLLM's grammar-constrained decoding (its structured outputs) for a JSON answer, or None."""
    from vllm.sampling_params import StructuredOutputsParams

    if request.json_schema is not None:
        return StructuredOutputsParams(json=request.json_schema)
    if request.json_object:
        return StructuredOutputsParams(json_object=True)
    if request.structural_tag is not None:  # strict functions' calls (api.strict_tools)
        return StructuredOutputsParams(structural_tag=json.dumps(request.structural_tag))
    return None


_NOT_SCHEMAS = frozenset({"enum", "const", "default", "examples"})  # values, not subschemas


def unsupported_place(schema: dict[str, Any]) -> str:
    """Where in ``schema`` vLLM's xgrammar check finds what it cannot enforce, as " (at #/…:
    {the subschema's own keywords})", or "" when no one place is to blame. vLLM says only that
    the schema has such features; its own check is run on each subschema alone (its nested
    subschemas left out), so this follows vLLM's rules as they are, not a copy of them."""
    try:
        from vllm.v1.structured_output.backend_xgrammar import has_xgrammar_unsupported_json_features
    except ImportError:
        return ""

    def own(node: dict[str, Any]) -> dict[str, Any]:
        """The node with its subschemas as empty stubs: their presence and number stay, which
        vLLM's check reads (properties beside patternProperties, two patterns, allOf's
        branches); propertyNames stays whole, read with its object's keywords."""
        return {
            k: (
                v
                if k == "propertyNames"
                else {name: {} for name in v}
                if isinstance(v, dict)
                else [{} if isinstance(item, dict) else item for item in v]
                if isinstance(v, list)
                else v
            )
            for k, v in node.items()
        }

    def find(node: Any, path: str) -> str | None:
        if isinstance(node, list):
            return next((p for n, item in enumerate(node) if (p := find(item, f"{path}/{n}"))), None)
        if not isinstance(node, dict):
            return None
        for key, value in node.items():
            nested = key not in _NOT_SCHEMAS and isinstance(value, dict | list)
            if nested and (place := find(value, f"{path}/{key}")):
                return place
        if has_xgrammar_unsupported_json_features(own(node)):
            return f" (at {path}: {json.dumps(own(node))[:200]})"
        return None

    try:
        return find(schema, "#") or ""
    except Exception:  # vLLM's check changed its ways: its own message stands alone
        return ""


def _about_the_grammar(message: str) -> bool:
    """Whether vLLM's refusal is of the job's JSON schema (its structured-output checks)."""
    words = ("schema", "grammar", "xgrammar", "structured output", "structural tag")
    return any(word in message.lower() for word in words)
