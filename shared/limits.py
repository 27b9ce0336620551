"""How long an answer may be, given its prompt: one rule for the front (before a job exists)
and the worker (which holds the tokenizer)."""

from __future__ import annotations

from shared.schemas import GenerationRequest


class InvalidJobRequest(ValueError):
    """The request cannot be served by this model (e.g. max_length is not above the prompt)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code  # OpenAI's error code, where it has one


def answer_budget(request: GenerationRequest, prompt_tokens: int, context_length: int | None) -> int:
    """How many new tokens the job may generate, or InvalidJobRequest when none fit."""
    limit = request.max_prompt_tokens
    if limit is not None and prompt_tokens > limit:
        raise InvalidJobRequest(
            f"the prompt is {prompt_tokens} tokens long; this server takes at most {limit} "
            "(STREAMQ_MAX_PROMPT_TOKENS)",
            param="messages",
            code="context_length_exceeded",  # as a context that is full: send less
        )
    budget = request.max_tokens
    # OpenAI's words: "the messages" for a conversation; a raw prompt is "the prompt".
    noun = "prompt" if request.raw else "messages"
    if context_length is not None and prompt_tokens >= context_length:
        # First: a prompt the model cannot take is the prompt's fault, whatever max_length says
        # (POST / has a max_length of 2048 when the client sends none).
        raise InvalidJobRequest(
            f"This model's maximum context length is {context_length} tokens. However, the "
            f"{noun} resulted in {prompt_tokens} tokens, which leaves no room for the "
            f"completion. Please reduce the length of the {noun}.",
            param="messages",
            code="context_length_exceeded",
        )
    if request.max_length is not None:
        if request.max_length <= prompt_tokens:
            raise InvalidJobRequest(
                f"max_length ({request.max_length}) must be greater than the prompt's length "
                f"({prompt_tokens} tokens)",
                param="max_length",
            )
        budget = min(budget, request.max_length - prompt_tokens)
    if context_length is not None:
        if request.max_tokens_given and prompt_tokens + request.max_tokens > context_length:
            raise InvalidJobRequest(
                f"This model's maximum context length is {context_length} tokens. However, you "
                f"requested {prompt_tokens + request.max_tokens} tokens ({prompt_tokens} in the "
                f"{noun}, {request.max_tokens} in the completion). Please reduce the length of "
                f"the {noun} or completion ('max_tokens').",
                param="max_tokens",
                code="context_length_exceeded",  # OpenAI's words and code: LiteLLM, for one, maps them
            )
        budget = min(budget, context_length - prompt_tokens)
    return budget


def may_not_fit(request: GenerationRequest, context_length: int | None) -> bool:
    """Whether the prompt's token count is needed to accept the request: max_length is given, or
    the text is long enough that it might not fit the context (with the max_tokens the client
    set). A token holds at least one byte (byte-level BPE; SentencePiece with byte fallback), so
    bytes + template room bound it. The same holds for the server's prompt-token limit."""
    if request.max_length is not None:
        return True
    most_tokens = request.size_bytes() + 256 + 16 * len(request.messages)
    if request.max_prompt_tokens is not None and most_tokens >= request.max_prompt_tokens:
        return True
    if context_length is None:
        return False
    return most_tokens + (request.max_tokens if request.max_tokens_given else 0) >= context_length
