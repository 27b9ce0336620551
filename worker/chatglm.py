"""ChatGLM models that bring their own ``stream_chat`` (loaded with trust_remote_code).

They are driven through that method, one job at a time: the answer it yields grows step
by step, and the job's deltas are the new text at each step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from shared.limits import InvalidJobRequest, answer_budget
from shared.schemas import ChatMessage, GenerationRequest, PromptInput
from worker.backend import GenerationStep, LoadedModel
from worker.text_decoding import StopMatcher


def has_own_stream_chat(model: Any) -> bool:
    return callable(getattr(model, "stream_chat", None))


def to_query_and_history(messages: list[ChatMessage]) -> tuple[str, list[tuple[str, str]]]:
    """ChatGLM's (query, [(query, response), ...]) from OpenAI-style messages.

    A system message is put before the first query, as ChatGLM-6B has no system role. The last
    turn (system messages aside) must be the user's: stream_chat has no other way to be asked.
    """
    if any(m.role == "tool" or m.tool_calls for m in messages):
        raise InvalidJobRequest("this model's stream_chat takes no tool calls or tool results", "messages")
    system = "\n".join(m.content for m in messages if m.role == "system")
    turns = [m for m in messages if m.role != "system"]
    if not turns or turns[-1].role != "user":
        raise InvalidJobRequest(
            "this model's stream_chat answers a question: the last message other than a system "
            "message must be the user's",
            "messages",
        )
    history: list[tuple[str, str]] = []
    pending: str | None = None
    for message in turns[:-1]:
        if message.role == "user":
            pending = message.content
        elif pending is not None:
            history.append((pending, message.content))
            pending = None
    query = turns[-1].content
    if system:
        if history:
            history[0] = (f"{system}\n\n{history[0][0]}", history[0][1])
        else:
            query = f"{system}\n\n{query}"
    return query, history


class ChatGLMChat(LoadedModel):
    """Adapter from a model's own ``stream_chat(tokenizer, query, history, max_length, top_p,
    temperature)`` to the job runner's steps. Stop sequences and seeds are applied here; top_k
    goes through the keyword arguments stream_chat hands on to ``generate`` (ChatGLM's do)."""

    def __init__(self, model: Any, tokenizer: Any, name: str, device: str, dtype: str) -> None:
        super().__init__(model, tokenizer, name, device, dtype)
        self.context_length: int | None = getattr(model.config, "seq_length", None) or getattr(
            model.config, "max_position_embeddings", None
        )

    def _count(self, text: str, tokenizer: Any = None) -> int:
        return len((tokenizer or self.tokenizer).encode(text, add_special_tokens=False))

    def prompt_tokens(self, prompt: PromptInput, tokenizer: Any = None) -> int:
        query, history = to_query_and_history(prompt.messages)
        return self._count(query, tokenizer) + sum(
            self._count(q, tokenizer) + self._count(a, tokenizer) for q, a in history
        )

    def generate(self, request: GenerationRequest) -> Iterator[GenerationStep]:
        import torch

        query, history = to_query_and_history(request.messages)
        n_prompt = self.prompt_tokens(request)
        budget = answer_budget(request, n_prompt, self.context_length)
        # Not the per-token draws of ``sampling.JobDraws``: stream_chat samples inside the model's
        # own code from torch's global generator, seeded once here, and it starts each answer from
        # the prompt, with no way to take the tokens an earlier run generated; so a job whose worker
        # was lost cannot continue here at all (``SerialModel.add`` fails it) and there is no
        # continuation whose draws could match. The global generator is also shared by the jobs a
        # worker interleaves (``SerialModel``): a seed repeats an answer when no other sampled job
        # runs beside it.
        if request.seed is not None:
            torch.manual_seed(request.seed)
        answer = ""
        steps = 0
        stops = StopMatcher(request.stop)
        extra = {"top_k": request.top_k} if request.top_k else {}  # top_k 1: the most likely token
        stream = self.model.stream_chat(
            self.tokenizer,
            query,
            history,
            max_length=n_prompt + budget,
            top_p=request.top_p,
            temperature=max(request.temperature, 1e-5),
            do_sample=request.temperature > 0 and request.top_k != 1,
            **extra,
        )
        for response, _history in stream:
            steps += 1
            if not response.startswith(answer):  # the model rewrote its answer: keep what was sent
                continue
            text, stopped = stops.push(response[len(answer) :])
            answer = response
            if stopped:
                yield GenerationStep(text, n_prompt, steps, "stop")
                return
            yield GenerationStep(text, n_prompt, steps)
        completion = self._count(answer)
        finish = "length" if completion >= budget else "stop"
        yield GenerationStep(stops.flush(), n_prompt, completion, finish)
