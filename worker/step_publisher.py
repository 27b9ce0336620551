"""Writing the engine's output to Redis: every job's new text in one pipelined round trip.

The engine hands over each step's outputs and goes on computing; this thread writes them.
A job's first text is written at once (time to first token), later text at most every
``publish_interval_ms`` (coalesced into one ``delta`` event), and its end at once. A round
trip carries, for every job it writes, the ``delta`` event, the text, the token counts and
a read of the job's cancel flag; and for every job that ended, its final state (the
FINISH_SCRIPT writes it exactly once). While one round trip is in flight the next steps'
outputs gather, so there is never more than one round trip per engine step.
"""

from __future__ import annotations

import logging
import queue
import time
from dataclasses import dataclass
from typing import Any

import redis

from shared import keys
from shared.job_state import (
    EVENT_CANCELED,
    EVENT_DELTA,
    EVENT_DONE,
    EVENT_ERROR,
    FINISH_SCRIPT,
    encode,
    finish_args,
)
from shared.settings import Settings
from worker.background import BackgroundThread
from worker.engine import EngineJob, JobOutput

log = logging.getLogger("streamq.worker")


@dataclass(eq=False)
class _Pending:
    job: EngineJob
    text: str = ""
    end: JobOutput | None = None
    last_write: float | None = None  # monotonic
    counts_dirty: bool = False


def final_record(output: JobOutput, finished_at: float) -> tuple[str, str, dict[str, Any], dict[str, Any]]:
    """(status, event, event data, job fields) for a job's end."""
    job = output.job
    reason = output.finish_reason
    if reason == "canceled":
        data = {"completion_tokens": job.completion_tokens}
        return "canceled", EVENT_CANCELED, data, {"finish_reason": "canceled", "finished_at": finished_at}
    if reason == "error":
        fields = {
            "finish_reason": "error",
            "finished_at": finished_at,
            "error_type": output.error_type,
            "error_message": output.error_message,
        }
        return "failed", EVENT_ERROR, {"type": output.error_type, "message": output.error_message}, fields
    first = job.first_token_at
    timings = {
        "queue_seconds": round(job.started_at - job.created_at, 6),
        "first_token_seconds": round(first - job.started_at, 6) if first else None,
        "generation_seconds": round(finished_at - job.started_at, 6),
        "tokens_per_second": (
            round(job.completion_tokens / (finished_at - first), 3) if first and finished_at > first else None
        ),
    }
    usage = {"prompt_tokens": job.prompt_tokens, "completion_tokens": job.completion_tokens}
    done = {"finish_reason": reason, "usage": usage, "timings": timings}
    return "finished", EVENT_DONE, done, {"finish_reason": reason, "finished_at": finished_at}


class StepPublisher(BackgroundThread):
    thread_name = "streamq-publisher"

    def __init__(self, connection: redis.Redis, settings: Settings) -> None:
        super().__init__()
        self._redis = connection
        self._interval = settings.publish_interval_ms / 1000.0
        self._maxlen = settings.stream_maxlen
        self._result_ttl = settings.result_ttl
        self._finish = connection.register_script(FINISH_SCRIPT)
        self._inbox: queue.SimpleQueue[list[JobOutput]] = queue.SimpleQueue()
        self._pending: dict[EngineJob, _Pending] = {}
        self.round_trips = 0

    def put(self, outputs: list[JobOutput]) -> None:
        self._inbox.put(outputs)

    def stop(self) -> None:
        """Write what is left, then stop."""
        self._stop.set()
        self._inbox.put([])
        self._thread.join(timeout=10)

    def _run(self) -> None:
        backoff = 0.05
        while True:
            self._take(self._next_due())
            if self._stop.is_set() and not self._pending:
                return
            try:
                self._write(time.monotonic(), final=self._stop.is_set())
                backoff = 0.05
            except redis.ResponseError as exc:  # Redis refused (e.g. out of memory): do not loop
                log.error("Redis refused job output (%s); the jobs concerned end failed", exc)
                self._give_up(str(exc))
            except redis.RedisError as exc:  # kept and written again once Redis answers
                log.warning("could not write job output to Redis (%s); retrying in %.2fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _give_up(self, reason: str) -> None:
        """Drop what could not be written; release the jobs that were ending (as failed)."""
        for p in list(self._pending.values()):
            p.text = ""
            if p.end is not None:
                p.job.status, p.job.error = "failed", f"could not write its end to Redis: {reason}"
                del self._pending[p.job]
                p.job.ended.set()

    def _next_due(self) -> float | None:
        """Seconds until some buffered text is due (None: nothing buffered, wait for output)."""
        if any(p.end is not None or (p.text and p.last_write is None) for p in self._pending.values()):
            return 0.0  # a write that failed: try again at once (after the backoff)
        due = [
            p.last_write + self._interval - time.monotonic()
            for p in self._pending.values()
            if p.text and p.last_write is not None
        ]
        return max(0.0, min(due)) if due else None

    def _take(self, wait: float | None) -> None:
        try:
            batch = self._inbox.get(timeout=wait if wait is not None else 1.0)
            while True:
                for output in batch:
                    pending = self._pending.get(output.job)
                    if pending is None:
                        pending = self._pending[output.job] = _Pending(output.job)
                    pending.text += output.text
                    pending.counts_dirty = True
                    if output.text and output.job.first_token_at is None:
                        output.job.first_token_at = time.time()
                    if output.finish_reason is not None:
                        pending.end = output
                batch = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _write(self, now: float, final: bool) -> None:
        due = [
            p
            for p in self._pending.values()
            if p.end is not None
            or final
            or (p.text and (p.last_write is None or now - p.last_write >= self._interval))
        ]
        if not due:
            return
        pipe = self._redis.pipeline(transaction=False)
        reads: list[tuple[int, _Pending]] = []
        ends: list[tuple[int, _Pending, str]] = []
        finished_at = time.time()
        for p in due:
            job_id = p.job.job_id
            if p.text:
                pipe.xadd(
                    keys.events(job_id),
                    {"event": EVENT_DELTA, "data": encode({"text": p.text})},
                    maxlen=self._maxlen,
                    approximate=True,
                )
                pipe.append(keys.text(job_id), p.text)
            if p.counts_dirty:
                pipe.hset(
                    keys.job(job_id),
                    mapping={
                        "prompt_tokens": p.job.prompt_tokens,
                        "completion_tokens": p.job.completion_tokens,
                    },
                )
            if p.end is not None:
                status, event, data, fields = final_record(p.end, finished_at)
                args = finish_args(status, event, data, self._result_ttl, self._maxlen, fields)
                job_keys = [keys.job(job_id), keys.events(job_id), keys.text(job_id)]
                self._finish(keys=job_keys, args=args, client=pipe)
                ends.append((len(pipe), p, status))
            else:
                pipe.hget(keys.job(job_id), "cancel")
                reads.append((len(pipe), p))
        results = pipe.execute()
        self.round_trips += 1
        for p in due:
            p.text, p.counts_dirty, p.last_write = "", False, now
        for index, p in reads:
            if results[index - 1] is not None:
                p.job.cancel.set()
        for index, p, status in ends:
            answer = results[index - 1]
            answer = answer.decode() if isinstance(answer, bytes) else str(answer)
            p.job.status = status if answer == "ok" else answer
            p.job.error = p.end.error_message if p.end is not None else ""
            del self._pending[p.job]
            p.job.ended.set()
