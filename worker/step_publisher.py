"""Writing the engine's output to Redis: every job's new text in one pipelined round trip.

The engine hands over each step's outputs and goes on computing; this thread writes them.
A job's first text is written at once (time to first token), later text at most every
``publish_interval_ms`` (coalesced into one ``delta`` event), and its end at once. A round
trip carries, for every job it writes, one DELTA_SCRIPT call (the ``delta`` event, the text,
the token ids, the counts, and a read of the job's cancel flag, all only if this run still
holds the job); and for every job that ended, its final state (FINISH_SCRIPT writes it
exactly once) or, for a job handed back by a stopping worker, REQUEUE_SCRIPT. While one
round trip is in flight the next steps' outputs gather, so there is never more than one
round trip per engine step.
"""

from __future__ import annotations

import logging
import os
import queue
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from shared import keys
from shared.job_state import (
    DELTA_SCRIPT,
    EVENT_CANCELED,
    EVENT_DONE,
    EVENT_ERROR,
    FINISH_SCRIPT,
    REQUEUE_SCRIPT,
    encode,
    ending_keys,
    finish_args,
    requeue_args,
)
from shared.settings import Settings
from worker.background import BackgroundThread
from worker.engine import EngineJob, JobOutput
from worker.metrics import WorkerMetrics

log = logging.getLogger("streamq.worker")

DRAIN_WINDOW = 120.0  # seconds of ended jobs kept per model for its drain rate


def job_keys(job_id: str) -> list[str]:
    """KEYS for DELTA_SCRIPT."""
    return [keys.job(job_id), keys.events(job_id), keys.text(job_id), keys.tokens(job_id)]


@dataclass(eq=False)
class _Pending:
    job: EngineJob
    text: str = ""
    end: JobOutput | None = None
    ids: list[int] = field(default_factory=list)
    stored: int = 0  # token ids of the job already in Redis (see DELTA_SCRIPT)
    last_write: float | None = None  # monotonic
    counts_dirty: bool = False
    counted: int = 0  # completion tokens already added to the generated-tokens metric


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

    def __init__(
        self, connection: redis.Redis, settings: Settings, metrics: WorkerMetrics | None = None
    ) -> None:
        super().__init__()
        self._metrics = metrics or WorkerMetrics("")
        self._redis = connection
        self._interval = settings.publish_interval_ms / 1000.0
        self._maxlen = settings.stream_maxlen
        self._result_ttl = settings.result_ttl
        self._finish = connection.register_script(FINISH_SCRIPT)
        self._delta = connection.register_script(DELTA_SCRIPT)
        self._requeue = connection.register_script(REQUEUE_SCRIPT)
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
                self._metrics.redis_errors.inc()
                log.error("Redis refused job output (%s); the jobs concerned end failed", exc)
                self._give_up(str(exc))
            except redis.RedisError as exc:  # kept and written again once Redis answers
                self._metrics.redis_errors.inc()
                log.warning("could not write job output to Redis (%s); retrying in %.2fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _give_up(self, reason: str) -> None:
        """Drop what could not be written; release the jobs that were ending (as failed)."""
        for p in list(self._pending.values()):
            p.text, p.ids, p.counts_dirty = "", [], False
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
        tokens = 0  # added to the metric once per call, not per output
        try:
            batch = self._inbox.get(timeout=wait if wait is not None else 1.0)
            while True:
                for output in batch:
                    pending = self._pending.get(output.job)
                    if pending is None:
                        resumed = len(output.job.resume_ids)
                        pending = _Pending(output.job, stored=resumed, counted=resumed)
                        self._pending[output.job] = pending
                    pending.text += output.text
                    pending.ids += output.token_ids
                    pending.counts_dirty = True
                    if output.completion_tokens > pending.counted:
                        tokens += output.completion_tokens - pending.counted
                        pending.counted = output.completion_tokens
                    if output.text and output.job.first_token_at is None:
                        output.job.first_token_at = time.time()
                        self._metrics.time_to_first_token.observe(
                            output.job.first_token_at - output.job.started_at
                        )
                    if output.finish_reason is not None and pending.end is None:
                        pending.end = output  # the first end stands
                batch = self._inbox.get_nowait()
        except queue.Empty:
            pass
        if tokens:
            self._metrics.generated_tokens.inc(tokens)

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
        writes: list[tuple[int, _Pending]] = []
        ends: list[tuple[int, _Pending, str]] = []
        finished_at = time.time()
        for p in due:
            job = p.job
            if job.lost:
                continue
            if job.run and (p.text or p.ids or p.counts_dirty):  # only a started run writes output
                data = encode({"text": p.text}) if p.text else ""
                args: list[Any] = [job.run, self._maxlen, data, p.text, job.prompt_tokens]
                args += [job.completion_tokens, p.stored, *p.ids]
                self._delta(keys=job_keys(job.job_id), args=args, client=pipe)
                writes.append((len(pipe), p))
            if p.end is not None:
                status, index = self._queue_end(pipe, p.end, finished_at)
                ends.append((index, p, status))
        results = pipe.execute() if len(pipe) else []
        self.round_trips += 1
        for _index, p in writes:  # their ids are in Redis now (written by this or an earlier try)
            p.stored += len(p.ids)
        for p in due:
            p.text, p.ids, p.counts_dirty, p.last_write = "", [], False, now
        for index, p in writes:
            flag = int(results[index - 1])
            if flag == 1:
                p.job.cancel.set()
            elif flag == -1:  # another run holds the job now (this worker was thought dead)
                p.job.lost = True
                p.job.cancel.set()
        for p in due:
            if p.job.lost and p.end is not None:
                self._release(p, "lost")
        for index, p, status in ends:
            if p.job in self._pending:
                answer = results[index - 1]
                answer = answer.decode() if isinstance(answer, bytes) else str(answer)
                self._release(p, status if answer in ("ok", "requeued") else answer)

    def _queue_end(self, pipe: Any, end: JobOutput, finished_at: float) -> tuple[str, int]:
        """Queue the script that ends the job (or hands it back); returns the status it aims for
        and the script's place in the pipeline (1-based)."""
        job = end.job
        if end.finish_reason == "handback":
            args = requeue_args(
                job.job_id, self._maxlen, self._result_ttl, 0, {"type": "", "message": ""}, job.run
            )
            queue = [keys.rq_queue(job.model)] if job.model else []
            self._requeue(keys=[*ending_keys(job.job_id), *queue], args=args, client=pipe)
            return "requeued", len(pipe)
        status, event, data, fields = final_record(end, finished_at)
        args = finish_args(status, event, data, self._result_ttl, self._maxlen, fields, job.run, job.job_id)
        self._finish(keys=ending_keys(job.job_id), args=args, client=pipe)
        index = len(pipe)
        if job.model:  # the model's drain rate: jobs ended per second (admission control)
            pipe.zadd(keys.drained(job.model), {f"{finished_at:.6f}:{os.urandom(3).hex()}": finished_at})
            pipe.zremrangebyscore(keys.drained(job.model), "-inf", finished_at - DRAIN_WINDOW)
            pipe.expire(keys.drained(job.model), int(DRAIN_WINDOW) + 60)
        return status, index

    def _release(self, p: _Pending, status: str) -> None:
        p.job.status = status
        p.job.error = p.end.error_message if p.end is not None else ""
        self._pending.pop(p.job, None)
        p.job.ended.set()
