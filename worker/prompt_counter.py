"""Answers the fronts' question "how many tokens is this prompt?" with the model's own
tokenizer and chat template, so that a request whose prompt does not fit (max_length not above
it, or past the model's context) is refused with a 4xx before any job exists.

It runs in its own thread with its own copy of the tokenizer (a fast tokenizer is not meant to
be shared between threads), so it answers while the main thread generates.
"""

from __future__ import annotations

import copy
import json
import logging
import time

import redis

from shared import keys
from shared.background import BackgroundThread
from shared.schemas import PromptInput
from worker.backend import ServedModel

log = logging.getLogger("streamq.worker")
REPLY_TTL = 30


class PromptCounter(BackgroundThread):
    thread_name = "streamq-prompt-counter"

    def __init__(
        self, connection: redis.Redis, backend: ServedModel, context_length: int | None = None
    ) -> None:
        super().__init__()
        self._redis = connection
        self._backend = backend
        # What one job may hold on this worker's engine (its STREAMQ_MAX_SEQ_LEN), as the
        # heartbeat says: the model's own context when the engine gives no other.
        self._context_length = context_length or backend.context_length
        self._tokenizer = copy.deepcopy(backend.tokenizer)
        self._key = keys.count_requests(backend.name)

    def answer(self, raw: bytes | str) -> tuple[str, dict[str, object]] | None:
        """The reply key and the answer to one request (None if the request is unreadable)."""
        try:
            request = json.loads(raw)
            prompt = PromptInput.model_validate(request["prompt"])
            reply = str(request["reply"])
            deadline = float(request.get("deadline", "inf"))
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable prompt-count request")
            return None
        if time.time() > deadline:  # the front stopped waiting: answer the fresh questions instead
            return None
        try:
            count: dict[str, object] = {"prompt_tokens": self._backend.prompt_tokens(prompt, self._tokenizer)}
        except Exception as exc:  # a template that refuses these messages: say why
            count = {"error": f"{type(exc).__name__}: {exc}"}
        count["context_length"] = self._context_length
        return reply, count

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                item = self._redis.brpop([self._key], timeout=1)
                backoff = 0.5
            except redis.RedisError as exc:
                log.warning("prompt counter lost Redis (%s); retrying in %.1fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            if item is None:
                continue
            answered = self.answer(item[1])
            if answered is None:
                continue
            reply, count = answered
            try:
                pipe = self._redis.pipeline(transaction=False)
                pipe.lpush(reply, json.dumps(count))
                pipe.expire(reply, REPLY_TTL)
                pipe.execute()
            except redis.RedisError as exc:
                log.warning("could not answer a prompt-count request: %s", exc)
