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
penalties, logit bias, grammar-constrained JSON.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.limits import InvalidJobRequest
from shared.logprobs import MAX_LOGPROBS, TokenLogprob
from shared.schemas import ENGINE_FEATURES, TOOLS, GenerationRequest
from shared.settings import Settings
from worker.answer_tokens import AnswerTokens
from worker.chat_prompt import ChatPrompt, PromptRenderer, eos_ids_of
from worker.engine import AnswerEnded, CannotContinue, EngineJob, JobOutput
from worker.token_logprobs import TokenTexts
from worker.vllm_cpu import check_head_size, default_kv_cache_bytes, set_cpu_defaults

log = logging.getLogger("streamq.worker")

DEFAULT_MAX_MODEL_LEN = 8192
GiB = 2**30


class VLLMServed(ChatPrompt):
    """What a vLLM worker serves, as the worker's threads see it: the tokenizer side only (vLLM
    loads the weights in its own engine)."""

    def __init__(
        self, name_or_path: str, tokenizer: Any, name: str, device: str, dtype: str, eos_ids: set[int]
    ) -> None:
        self.name_or_path = name_or_path
        self.tokenizer = tokenizer
        self.name = name
        self.device = device
        self.dtype = dtype
        self.eos_ids = eos_ids
        self.model_context: int | None = None  # the model's own (max_position_embeddings)
        self.kv_bytes_per_token: int | None = None  # keys and values of every layer, in dtype
        self.context_length: int | None = None  # set by the engine: vLLM's max_model_len


def vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def load_vllm_served(settings: Settings, served: str, device: str) -> VLLMServed:
    """The tokenizer, chat template and end-of-sequence ids of ``settings.model``, to serve on
    ``device`` (resolved: cpu or cuda)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from worker.engine_setup import kv_bytes_per_token
    from worker.model_loading import resolve_dtype

    if not vllm_installed():
        raise ValueError("the vLLM engine is not installed: run `make install-vllm` (see README)")
    model = settings.model or ""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"the vLLM engine runs on 'cpu' or 'cuda', not {device!r}")
    dtype = resolve_dtype(settings.dtype, device)
    remote = settings.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=remote)
    config = AutoConfig.from_pretrained(model, trust_remote_code=remote)
    try:
        generation: Any = GenerationConfig.from_pretrained(model)
    except OSError:
        generation = None
    eos_ids = eos_ids_of(tokenizer, generation, config)
    served_model = VLLMServed(model, tokenizer, served, device, dtype, eos_ids)
    served_model.model_context = getattr(config, "max_position_embeddings", None)
    if device == "cpu":
        check_head_size(config)
    if getattr(config, "num_hidden_layers", None) and getattr(config, "num_attention_heads", None):
        served_model.kv_bytes_per_token = kv_bytes_per_token(config, 4 if dtype == "float32" else 2)
    return served_model


def check_kv_budget(settings: Settings, served: VLLMServed, max_len: int) -> None:
    """Refuse a KV cache too small for one job of ``max_len`` tokens, before vLLM starts (and
    fails far less clearly, in its engine process)."""
    per_token = served.kv_bytes_per_token
    if not settings.kv_cache_gib or not per_token:
        return
    tokens = int(settings.kv_cache_gib * GiB) // per_token
    if tokens < max_len:
        need = max_len * per_token / GiB
        raise ValueError(
            f"STREAMQ_KV_CACHE_GIB={settings.kv_cache_gib:g} holds about {tokens} tokens of this "
            f"model, and one job may take {max_len} (STREAMQ_MAX_SEQ_LEN): give the KV cache at "
            f"least {need:.2f} GiB, or lower STREAMQ_MAX_SEQ_LEN"
        )


def job_length(settings: Settings, served: VLLMServed) -> int:
    """Prompt + answer tokens of one job: vLLM's max_model_len."""
    context = min(served.model_context or DEFAULT_MAX_MODEL_LEN, DEFAULT_MAX_MODEL_LEN)
    return settings.max_seq_len or context


def engine_args(settings: Settings, served: VLLMServed) -> Any:
    from vllm import EngineArgs
    from vllm.config import StructuredOutputsConfig

    kv_bytes = int(settings.kv_cache_gib * GiB) if settings.kv_cache_gib else None
    if kv_bytes is None and served.device == "cpu":
        kv_bytes = default_kv_cache_bytes(job_length(settings, served), served.kv_bytes_per_token)
    return EngineArgs(
        # On a CPU, vLLM runs the model in an executor process of its own (its OpenMP threads are
        # bound there); that process exits when the worker dies, however it dies.
        distributed_executor_backend="mp" if served.device == "cpu" else None,
        model=served.name_or_path,
        served_model_name=served.name,
        dtype=served.dtype,
        trust_remote_code=settings.trust_remote_code,
        max_model_len=job_length(settings, served),
        max_num_seqs=settings.slots,
        kv_cache_memory_bytes=kv_bytes,
        tensor_parallel_size=settings.tensor_parallel_size,
        pipeline_parallel_size=settings.pipeline_parallel_size,
        enforce_eager=settings.vllm_eager,
        # JSON answers without free whitespace (engine-wide in vLLM): a model cannot pad one out
        # until max_tokens, and the JSON is as valid.
        structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
        # Log probabilities of the model's own distribution, before temperature, penalties, bias
        # or a grammar change it (vLLM's default, as OpenAI reports them), up to OpenAI's limit.
        logprobs_mode="raw_logprobs",
        max_logprobs=MAX_LOGPROBS,
        disable_log_stats=True,
    )


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
        for token in job.resume_ids:  # continue an earlier run: replayed here, their text was sent
            answer.push(token)
            if answer.finish_reason is not None:
                break
        job.completion_tokens = answer.completion_tokens
        if answer.finish_reason is not None:
            raise AnswerEnded(answer.finish_reason)
        if job.resume_ids:
            check_continuable(job.request)
        # A continued job's prompt log probabilities went out with its earlier run's first output.
        prompt_logprobs = job.request.prompt_logprobs is not None and not job.resume_ids
        request_id = f"{job.job_id}-{job.run or 'local'}-{next(self._ids)}"
        try:
            params = self.sampling(job.request, answer.budget - answer.completion_tokens, prompt_logprobs)
            self.vllm.add_request(request_id, TokensPrompt(prompt_token_ids=prompt + job.resume_ids), params)
        except refusals() as exc:  # vLLM's own checks: a token id out of its vocabulary, a bad schema
            asked_json = job.request.json_schema is not None or job.request.json_object
            param = "response_format" if asked_json and _about_the_grammar(str(exc)) else None
            raise InvalidJobRequest(f"the vLLM engine refused the request: {exc}", param) from exc
        held = _Request(job, request_id, answer, prompt_logprobs)
        self._held[job] = held
        self._by_id[request_id] = held

    def sampling(self, request: GenerationRequest, max_tokens: int, prompt_logprobs: bool = True) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

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
            structured_outputs=structured_outputs(request),
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
            for place, token in enumerate(completion.token_ids):
                taken = len(answer.token_ids)
                text += answer.push(token)
                if k is not None and len(answer.token_ids) > taken:  # the answer took it (not an EOS)
                    logprobs.append(_logprob_entry(self.texts, token, completion.logprobs[place], k))
                if answer.finish_reason is not None:
                    break
            failure = ""
            if result.finished and answer.finish_reason is None:
                # vLLM's own end of a request it could not go on with (a grammar that failed to
                # compile or refused a token, a KV load that failed): the job fails, not "stop".
                if completion.finish_reason in ("abort", "error"):
                    failure = f"the vLLM engine ended the request ({completion.finish_reason})"
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
                    "generation_error" if failure else "",
                    failure,
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


def check_continuable(request: GenerationRequest) -> None:
    """CannotContinue for a job this engine cannot continue from its earlier run's tokens: a JSON
    answer (``response_format``, or a call that ``tool_choice`` forces). vLLM hands those tokens
    to the model as prompt, and its grammar starts from the beginning of the answer, so the
    continuation would begin a second JSON value mid-answer. (The transformers engine replays
    them through the grammar.)"""
    if request.json_schema is not None or request.json_object:
        raise CannotContinue(
            "its worker stopped mid-answer, and the vLLM engine cannot continue a JSON answer (its "
            "grammar would start again mid-answer): send the request again"
        )


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
    return None


def kv_cache_tokens(engine: Any) -> int | None:
    cache = engine.vllm_config.cache_config
    blocks = getattr(cache, "num_gpu_blocks", None)
    return int(blocks) * int(cache.block_size) if blocks else None


def build_vllm_model(settings: Settings, served: VLLMServed) -> tuple[VLLMModel, int]:
    """Start vLLM's engine on the model; the slots are what its scheduler and KV cache hold."""
    check_kv_budget(settings, served, job_length(settings, served))
    if served.device == "cpu":
        set_cpu_defaults(settings)
    # vLLM's engine core (its scheduler) in this process, stepped by the worker's engine thread:
    # in a process of its own it would outlive a worker killed with SIGKILL, holding its memory.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLMEngine

    engine = LLMEngine.from_engine_args(engine_args(settings, served))
    config = engine.vllm_config
    max_len = int(config.model_config.max_model_len)
    max_seqs = int(config.scheduler_config.max_num_seqs)
    kv_tokens = kv_cache_tokens(engine)
    # Every job the worker takes has room for its whole length in the KV cache, so vLLM never
    # preempts one: STREAMQ_SLOTS asks for more (vLLM then preempts and recomputes when short).
    fit = max(1, kv_tokens // max_len) if kv_tokens else max_seqs
    slots = settings.slots or min(max_seqs, fit)
    served.context_length = max_len
    log.info(
        "vLLM engine: %d slots (max_num_seqs %d, KV cache %s tokens), %d tokens per job",
        slots,
        max_seqs,
        kv_tokens if kv_tokens is not None else "?",
        max_len,
    )
    return VLLMModel(engine, served, slots, max_len), max_len


def _about_the_grammar(message: str) -> bool:
    """Whether vLLM's refusal is of the job's JSON schema (its structured-output checks)."""
    return any(word in message.lower() for word in ("schema", "grammar", "xgrammar", "structured output"))
