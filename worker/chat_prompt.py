"""A chat model's text side: its chat template, token counts, end-of-sequence ids and answer budget.

Both engines use it, so a prompt is counted and rendered the same way whichever engine runs the
job: the transformers engine (``CausalLMChat``, which adds the model) and the vLLM engine (which
needs only the tokenizer here; vLLM loads the weights itself).
"""

from __future__ import annotations

import copy
import threading
from typing import Any

from jinja2 import TemplateError

from shared.limits import InvalidJobRequest, answer_budget
from shared.schemas import GenerationRequest, PromptInput
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

    def encode(self, prompt: PromptInput, tokenizer: Any = None) -> list[int]:
        """Token ids of the prompt: a conversation (and its tools) rendered with the tokenizer's
        chat template, or a raw prompt as it is (text tokenized with the tokenizer's special
        tokens, such as a BOS, as a completion server does)."""
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        if prompt.token_ids is not None:
            return list(prompt.token_ids)
        if prompt.text is not None:
            return list(tokenizer(prompt.text, add_special_tokens=True)["input_ids"])
        turns = [m.template_turn() for m in prompt.messages]
        if getattr(tokenizer, "chat_template", None):
            tools = [t.model_dump(exclude_none=True) for t in prompt.tools] if prompt.tools else None
            try:
                text = tokenizer.apply_chat_template(
                    turns, tools=tools, add_generation_prompt=True, tokenize=False
                )
            except TemplateError as exc:  # the template's own check (``raise_exception``)
                raise InvalidJobRequest(
                    f"the model's chat template refused the conversation: {exc}", "messages"
                ) from exc
        elif prompt.tools:
            raise ValueError("this model has no chat template to give it tools")
        else:  # a base model without a template: a plain transcript
            text = "".join(f"{t['role']}: {t['content']}\n" for t in turns) + "assistant: "
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_tokens(self, prompt: PromptInput, tokenizer: Any = None) -> int:
        return len(self.encode(prompt, tokenizer))

    def takes_tools(self) -> bool:
        """Whether the chat template renders tools, and its calls are Hermes' ``<tool_call>``
        blocks (Qwen2.5, Hermes, and others), the one format streamq parses."""
        template = getattr(self.tokenizer, "chat_template", None)
        return isinstance(template, str) and "tools" in template and "<tool_call>" in template

    def answer(self, request: GenerationRequest, n_prompt: int, limit: int | None = None) -> AnswerTokens:
        """The job's answer state, with its budget (InvalidJobRequest when nothing fits)."""
        context = self.context_length
        if limit is not None:  # e.g. the batching engine's room per job
            context = min(context, limit) if context else limit
        budget = answer_budget(request, n_prompt, context)
        return AnswerTokens(self.tokenizer, self.eos_ids, request.stop, budget)


class PromptRenderer:
    """Renders jobs' prompts in their job threads (``BatchModel.prepare``), not in the engine's:
    a chat template with tools takes milliseconds per prompt, and a burst of such jobs rendered
    between two steps would hold back every running job. It has a tokenizer of its own (a fast
    tokenizer borrowed by two threads at once can fail with "Already borrowed", and the engine
    thread decodes with the model's) and renders one prompt at a time."""

    def __init__(self, prompts: ChatPrompt) -> None:
        self._prompts = prompts
        self._tokenizer = copy.deepcopy(prompts.tokenizer)
        self._lock = threading.Lock()

    def render(self, request: PromptInput) -> tuple[list[int] | None, Exception | None]:
        """The prompt's token ids, or what rendering it raised (the job fails with it when it
        joins the engine, as if the engine had rendered it)."""
        with self._lock:
            try:
                return self._prompts.encode(request, self._tokenizer), None
            except Exception as exc:
                return None, exc
