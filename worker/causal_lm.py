"""Chat generation for any transformers causal LM: chat template, KV-cached decode, per-job sampling."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import torch

from shared.limits import answer_budget
from shared.schemas import ChatMessage, GenerationRequest
from worker.backend import GenerationStep, LoadedModel
from worker.sampling import SamplingParams, sample_next
from worker.text_decoding import IncrementalDecoder, StopMatcher


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

    @torch.inference_mode()
    def generate(self, request: GenerationRequest) -> Iterator[GenerationStep]:
        prompt = self.encode(request.messages)
        n_prompt = len(prompt)
        budget = answer_budget(request, n_prompt, self.context_length)
        params = SamplingParams(request.temperature, request.top_p, request.top_k)
        generator = torch.Generator(device=self.device)
        generator.manual_seed(request.seed if request.seed is not None else random.getrandbits(63))
        decoder = IncrementalDecoder(self.tokenizer)
        stops = StopMatcher(request.stop)

        out = self.model(
            input_ids=torch.tensor([prompt], device=self.device), use_cache=True, logits_to_keep=1
        )
        for produced in range(1, budget + 1):
            token = sample_next(out.logits[0, -1], params, generator)
            if token in self.eos_ids:
                tail, _ = stops.push(decoder.flush())
                yield GenerationStep(tail + stops.flush(), n_prompt, produced - 1, "stop")
                return
            text, stopped = stops.push(decoder.push(token))
            if stopped:
                yield GenerationStep(text, n_prompt, produced, "stop")
                return
            if produced == budget:
                tail, stopped = stops.push(decoder.flush())
                text += tail if stopped else tail + stops.flush()
                yield GenerationStep(text, n_prompt, produced, "stop" if stopped else "length")
                return
            yield GenerationStep(text, n_prompt, produced)
            out = self.model(
                input_ids=torch.tensor([[token]], device=self.device),
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
