"""A chat model's text side: its chat template, token counts, end-of-sequence ids and answer budget.

Both engines use it, so a prompt is counted and rendered the same way whichever engine runs the
job: the transformers engine (``CausalLMChat``, which adds the model) and the vLLM engine (which
needs only the tokenizer here; vLLM loads the weights itself).
"""

from __future__ import annotations

from typing import Any

from shared.limits import answer_budget
from shared.schemas import ChatMessage, GenerationRequest
from worker.answer_tokens import AnswerTokens


def eos_ids_of(tokenizer: Any, *sources: Any) -> set[int]:
    """Every end-of-sequence id the tokenizer and the model's configs name."""
    ids: set[int] = set()
    for source in (*sources, tokenizer):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


class ChatPrompt:
    """Renders conversations into token ids and sets up each job's answer state."""

    tokenizer: Any
    eos_ids: set[int]
    context_length: int | None

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

    def answer(self, request: GenerationRequest, n_prompt: int, limit: int | None = None) -> AnswerTokens:
        """The job's answer state, with its budget (InvalidJobRequest when nothing fits)."""
        context = self.context_length
        if limit is not None:  # e.g. the batching engine's room per job
            context = min(context, limit) if context else limit
        budget = answer_budget(request, n_prompt, context)
        return AnswerTokens(self.tokenizer, self.eos_ids, request.stop, budget)
