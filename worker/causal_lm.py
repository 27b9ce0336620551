"""Chat generation for any transformers causal LM: chat template, KV-cached decode, per-job sampling."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

from shared.limits import answer_budget
from shared.schemas import ChatMessage, GenerationRequest
from worker.answer_tokens import AnswerTokens
from worker.backend import GenerationStep, LoadedModel
from worker.sampling import SamplingParams, sample_next


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


class CausalLMChat(LoadedModel):
    """Drives a causal LM one token at a time, following ChatGLM's ``stream_chat`` contract."""

    def __init__(self, model: Any, tokenizer: Any, name: str, device: str, dtype: str) -> None:
        super().__init__(model, tokenizer, name, device, dtype)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.context_length: int | None = getattr(model.config, "max_position_embeddings", None)

    def encode(self, messages: list[ChatMessage], tokenizer: Any = None) -> list[int]:
        """Token ids of the conversation rendered with the tokenizer's chat template."""
        tokenizer = tokenizer or self.tokenizer
        turns = [m.model_dump() for m in messages]
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
        else:  # a base model without a template: a plain transcript
            text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, messages: list[ChatMessage], tokenizer: Any = None) -> int:
        return len(self.encode(messages, tokenizer))

    def sampling(self, request: GenerationRequest) -> tuple[SamplingParams, torch.Generator]:
        """A job's sampling settings and its own random generator (seeded when it asks)."""
        generator = torch.Generator(device=self.device)
        generator.manual_seed(request.seed if request.seed is not None else random.getrandbits(63))
        return SamplingParams(request.temperature, request.top_p, request.top_k), generator

    def answer(self, request: GenerationRequest, n_prompt: int, limit: int | None = None) -> AnswerTokens:
        """The job's answer state, with its budget (InvalidJobRequest when nothing fits)."""
        context = self.context_length
        if limit is not None:  # e.g. the batching engine's room per job
            context = min(context, limit) if context else limit
        budget = answer_budget(request, n_prompt, context)
        return AnswerTokens(self.tokenizer, self.eos_ids, request.stop, budget)

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> Iterator[GenerationStep]:
        """One job alone, token by token with a KV cache (the batching engine's reference)."""
        prompt = self.encode(request.messages)
        n_prompt = len(prompt)
        answer = self.answer(request, n_prompt)
        params, generator = self.sampling(request)
        out = self.model(
            input_ids=torch.tensor([prompt], device=self.device), use_cache=True, logits_to_keep=1
        )
        while True:
            text = answer.push(sample_next(out.logits[0, -1], params, generator))
            yield GenerationStep(text, n_prompt, answer.completion_tokens, answer.finish_reason)
            if answer.finish_reason is not None:
                return
            out = self.model(
                input_ids=torch.tensor([[answer.token_ids[-1]]], device=self.device),
                cache=out.cache,
                use_cache=True,
            )

    def stream_chat(
        self,
        tokenizer: Any,
        query: str,
        history: list[tuple[str, str]] | None = None,
        max_length: int = 2048,
        top_p: float = 0.7,
        temperature: float = 0.95,
        **kwargs: Any,
    ) -> Iterator[tuple[str, list[tuple[str, str]]]]:
        """ChatGLM's interface: yields (answer so far, history including this turn) per step."""
        del tokenizer  # the model's own tokenizer is used, as ChatGLM's models do
        history = list(history or [])
        messages: list[ChatMessage] = []
        for q, a in history:
            messages += [ChatMessage(role="user", content=q), ChatMessage(role="assistant", content=a)]
        messages.append(ChatMessage(role="user", content=query))
        request = GenerationRequest(
            messages=messages,
            max_tokens=max_length,
            max_length=max_length,
            temperature=temperature,
            top_p=top_p,
            top_k=int(kwargs.get("top_k", 0)),
            stop=list(kwargs.get("stop", [])),
            seed=kwargs.get("seed"),
        )
        answer = ""
        for step in self.generate(request):
            answer += step.delta
            yield answer, [*history, (query, answer)]
