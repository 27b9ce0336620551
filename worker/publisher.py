"""Writing one job's output to Redis: coalesced deltas, the cancel flag, the final state."""

from __future__ import annotations

import time
from typing import Any

import redis

from shared import keys
from shared.job_state import EVENT_DELTA, FINISH_SCRIPT, encode, finish_args
from shared.settings import Settings


class JobPublisher:
    """Buffers a job's new text and writes it as one ``delta`` event per flush.

    The first token is written at once (time to first token); later ones at most every
    ``publish_interval_ms``, so a job costs a bounded number of Redis writes per second.
    Each flush is one pipelined round trip that also reads the job's cancel flag.
    """

    def __init__(self, connection: redis.Redis, job_id: str, settings: Settings) -> None:
        self._redis = connection
        self._job_id = job_id
        self._interval = settings.publish_interval_ms / 1000.0
        self._maxlen = settings.stream_maxlen
        self._result_ttl = settings.result_ttl
        self._finish = connection.register_script(FINISH_SCRIPT)
        self._pending = ""
        self._last_flush: float | None = None
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.cancel_requested = False

    def add(self, delta: str, prompt_tokens: int, completion_tokens: int) -> None:
        """Record one step's output; flush if the interval has passed (or this is the first text)."""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens
        self._pending += delta
        now = time.monotonic()
        if self.first_token_at is None and completion_tokens > 0:
            self.first_token_at = time.time()
        if self._pending and (self._last_flush is None or now - self._last_flush >= self._interval):
            self.flush()

    def _queue_pending(self, pipe: Any) -> None:
        if self._pending:
            pipe.xadd(
                keys.events(self._job_id),
                {"event": EVENT_DELTA, "data": encode({"text": self._pending})},
                maxlen=self._maxlen,
                approximate=True,
            )
            pipe.append(keys.text(self._job_id), self._pending)
        pipe.hset(
            keys.job(self._job_id),
            mapping={"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens},
        )
        self._pending = ""

    def flush(self) -> None:
        """Write buffered text and token counts; read the cancel flag. One round trip."""
        pipe = self._redis.pipeline(transaction=False)
        self._queue_pending(pipe)
        pipe.hget(keys.job(self._job_id), "cancel")
        results = pipe.execute()
        self._last_flush = time.monotonic()
        if results[-1] is not None:
            self.cancel_requested = True

    def finish(self, status: str, event: str, data: dict[str, Any], fields: dict[str, Any]) -> str:
        """Write what is left and the final state (once; see FINISH_SCRIPT). Returns the script's answer."""
        pipe = self._redis.pipeline(transaction=False)
        self._queue_pending(pipe)
        job_keys = [keys.job(self._job_id), keys.events(self._job_id), keys.text(self._job_id)]
        args = finish_args(status, event, data, self._result_ttl, self._maxlen, fields)
        self._finish(keys=job_keys, args=args, client=pipe)
        answer = pipe.execute()[-1]
        return answer.decode() if isinstance(answer, bytes) else str(answer)
