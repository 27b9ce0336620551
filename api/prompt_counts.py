"""Whether a prompt fits the model's context, asked of one of its workers (the front holds no
tokenizer): a question on a Redis list that a worker thread answers beside generation."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time

import redis.asyncio as aioredis

from api.errors import ApiError
from shared import keys
from shared.limits import InvalidJobRequest, answer_budget
from shared.schemas import GenerationRequest
from shared.settings import Settings

log = logging.getLogger("streamq.api")


class PromptCounts:
    def __init__(self, settings: Settings, connection: aioredis.Redis) -> None:
        self._settings = settings
        self._redis = connection  # the count connections: a BLPOP holds one
        self._counting = asyncio.Semaphore(2)  # one per count connection

    async def check(self, model: str, generation: GenerationRequest, context_length: int | None) -> None:
        """Ask a worker of the model for the prompt's token count and refuse (400) a request that
        cannot fit. Without an answer in time (or with both count connections busy) the job is
        accepted: its worker checks it again and fails it with the reason."""
        if self._counting.locked():
            log.info("prompt counts are all busy; the worker will check this prompt's length")
            return
        timeout = self._settings.count_timeout
        reply = keys.count_reply(secrets.token_hex(8))
        question = json.dumps(
            {
                "reply": reply,
                "deadline": time.time() + timeout,
                "prompt": generation.prompt_input().model_dump(mode="json", exclude_none=True),
            }
        )
        async with self._counting:
            pipe = self._redis.pipeline(transaction=False)
            pipe.lpush(keys.count_requests(model), question)
            pipe.expire(keys.count_requests(model), 60)
            await pipe.execute()
            answer = await self._redis.blpop([reply], timeout=timeout)
        if answer is None:
            log.warning("no worker of %s counted a prompt in time; the worker will check it", model)
            return
        count = json.loads(answer[1])
        if "error" in count:
            raise ApiError(400, f"the model cannot render these messages: {count['error']}", param="messages")
        # The smallest context the model's live workers serve (``context_length``, from their
        # heartbeats): the job may run on any of them.
        served = [n for n in (count.get("context_length"), context_length) if n]
        try:
            answer_budget(generation, int(count["prompt_tokens"]), min(served, default=None))
        except InvalidJobRequest as exc:
            raise ApiError(400, str(exc), param=exc.param, code=exc.code) from None
