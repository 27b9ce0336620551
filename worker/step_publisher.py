"""Writing the engine's output to Redis: every job's new text in one pipelined round trip.

The engine hands over each step's outputs and goes on computing; this thread writes them.
A job's first text is written at once (time to first token), later text at most every
``publish_interval_ms`` (coalesced into one ``delta`` event), and its end at once. A round
trip carries, for every job it writes, one ``scripts.delta`` call (the ``delta`` event, the text,
the token ids, the counts, and a read of the job's cancel flag, all only if this run still
holds the job); and for every job that ended, its final state (``scripts.finish`` writes it
exactly once) or, for a job handed back by a stopping worker, ``scripts.requeue``. While one
round trip is in flight the next steps' outputs gather, so there is never more than one
round trip per engine step.

The engine wakes this thread only for output that must be written before it would wake anyway:
a job's end, or text of a job whose next write (``EngineJob.publish_due``: at once for its first
text, else ``publish_interval_ms`` after its last write) comes before this thread's planned
wake-up (while it is awake, any text wakes its next wait). Other output waits in the outbox
until then. A fast engine steps hundreds of times a second, and a thread woken at every step
takes the interpreter from the engine's thread each time.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any

import redis

from shared import keys
from shared.background import BackgroundThread
from shared.job_store import scripts
from shared.job_store.payloads import Done
from shared.job_store.scripts import Answer, DeltaAnswer, Ending, JobScripts, ended_canceled, ended_failed
from shared.job_store.vocabulary import EventName, FinishReason, JobField, JobStatus
from shared.logprobs import TokenLogprob
from shared.schemas import Timings, Usage
from shared.settings import Settings
from worker.engine import HANDBACK, EngineJob, JobOutput
from worker.metrics import WorkerMetrics

log = logging.getLogger("streamq.worker")

DRAIN_WINDOW = 120.0  # seconds of ended jobs kept per model for its drain rate
DRAIN_TRIM_EVERY = 5.0  # seconds between trims of a model's drained set (not one per job)


@dataclass(eq=False)
class _Pending:
    job: EngineJob
    text: str = ""
    end: JobOutput | None = None
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None
    stored: int = 0  # token ids of the job already in Redis (see scripts.delta)
    counts_dirty: bool = False
    counted: int = 0  # completion tokens already added to the generated-tokens metric


def final_record(output: JobOutput, finished_at: float) -> Ending:
    """The job's final state for its end."""
    job = output.job
    reason = output.finish_reason
    if reason == FinishReason.CANCELED:
        return ended_canceled(job.completion_tokens, finished_at)
    if reason == FinishReason.ERROR:
        return ended_failed(
            output.error_type, output.error_message, finished_at, output.error_param, output.error_code
        )
    # A continued job's: its wait before its first run; this run's time to its first token, its
    # time, and its rate over the tokens it generated (not those an earlier run did) after its
    # first: the tokens after the first over the time since it (all of them over that time made
    # a short answer look many times faster: 20 tokens, 705 tok/s).
    first = job.first_token_at
    after_first = job.completion_tokens - len(job.resume_ids) - 1
    timings = Timings(
        queue_seconds=round((job.first_started_at or job.started_at) - job.created_at, 6),
        first_token_seconds=round(first - job.started_at, 6) if first else None,
        generation_seconds=round(finished_at - job.started_at, 6),
        tokens_per_second=(
            round(after_first / (finished_at - first), 3)
            if first and finished_at > first and after_first > 0
            else None
        ),
    )
    usage = Usage(prompt_tokens=job.prompt_tokens, completion_tokens=job.completion_tokens)
    done = Done(finish_reason=reason, usage=usage, timings=timings)
    fields: dict[str, Any] = {JobField.FINISH_REASON: reason, JobField.FINISHED_AT: finished_at}
    return Ending(JobStatus.FINISHED, EventName.DONE, done, fields)


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
        self._scripts = JobScripts(connection)
        self._outbox: deque[list[JobOutput]] = deque()  # appended by the engine's thread
        self._wake = threading.Event()  # set when some output in the outbox is due
        self._wake_at = math.inf  # monotonic time this thread sleeps until; inf while awake
        self._pending: dict[EngineJob, _Pending] = {}
        self.round_trips = 0
        self.wakeups = 0  # waits ended early by the engine's output (or a stop)
        self._stop_seen = False
        self._trimmed: dict[str, float] = {}  # model → when its drained set was last trimmed

    def put(self, outputs: list[JobOutput]) -> None:
        """Called by the engine's thread after each step (and by a job's thread for an end)."""
        self._outbox.append(outputs)
        wake_at = self._wake_at
        for output in outputs:
            if output.finish_reason is not None or (output.text and output.job.publish_due < wake_at):
                self._wake.set()
                return

    def stop(self) -> None:
        """Write what is left, then stop."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        backoff = 0.05
        while True:
            self._wait_for_due()
            if self._stop.is_set() and not self._pending:
                return
            try:
                self._write(time.monotonic(), final=self._stop.is_set())
                backoff = 0.05
            except redis.RedisError as exc:  # kept and written again once Redis answers
                self._metrics.redis_errors.inc()
                log.warning("could not write job output to Redis (%s); retrying in %.2fs", exc, backoff)
                time.sleep(backoff)
                backoff = min(backoff * 2, 2.0)

    def _refused(self, p: _Pending, exc: Exception) -> None:
        """Redis refused this job's write (out of memory, say) and ran the others': its output is
        dropped, and so is the job here, so that no later write leaves a hole where this one's
        text was. Redis holds the job's output up to the write before; once its lease lapses the
        job is continued from there (here or on another worker)."""
        self._metrics.redis_errors.inc()
        log.error(
            "job %s: Redis refused its output (%s); dropped here, to be continued from what Redis "
            "holds once its lease lapses",
            p.job.job_id,
            exc,
        )
        if p.end is None:  # else its handback went in the same round trip: its answer decides
            p.job.lost = True
            p.job.cancel.set()

    def _end_refused(self, p: _Pending, exc: Exception) -> None:
        """Redis refused the job's end. A run's job is lost here: its record in Redis still says
        running, and it is continued from there once its lease lapses (failed here, RQ would
        file it failed, and the janitor end it so). A job no run holds (it expired in its queue)
        ends failed here."""
        self._metrics.redis_errors.inc()
        log.error("job %s: Redis refused its end (%s)", p.job.job_id, exc)
        if p.job.run:
            p.job.lost = True
            self._release(p, "lost")
            return
        p.job.status, p.job.error = JobStatus.FAILED, f"could not write its end to Redis: {exc}"
        p.job.error_type = "redis_error"
        self._pending.pop(p.job, None)
        p.job.ended.set()

    def _next_due(self) -> float:
        """When (monotonic) some buffered text is due: -inf for now (an end; after a stop, any
        text), inf when nothing is buffered."""
        if any(p.end is not None or (self._stop_seen and p.text) for p in self._pending.values()):
            return -math.inf  # an end not yet written (one that failed: again after the backoff)
        return min((p.job.publish_due for p in self._pending.values() if p.text), default=math.inf)

    def _wait_for_due(self) -> None:
        """Take what the engine put, then sleep until the earliest write is due or the engine
        puts output due sooner (or a stop), and take what it put meanwhile."""
        self._take()  # output put during the last round trip: planned for, not a wake-up
        if self._stop.is_set() and (not self._stop_seen or not self._pending):
            self._stop_seen = True  # write everything now; then wait only for ends still to come
            return
        due = self._next_due()
        wait = due - time.monotonic()
        if wait > 0:
            self._wake_at = due
            self.wakeups += self._wake.wait(min(wait, 1.0))
            self._wake_at = math.inf  # awake: any text put from now on sets the event
            self._take()

    def _take(self) -> None:
        """Move the outbox into the jobs' buffers."""
        tokens = 0  # added to the metric once per call, not per output
        self._wake.clear()  # before the outbox is read: output put after this sets it again
        while self._outbox:
            for output in self._outbox.popleft():
                pending = self._pending.get(output.job)
                if pending is None:
                    resumed = len(output.job.resume_ids)
                    pending = _Pending(output.job, stored=resumed, counted=resumed)
                    self._pending[output.job] = pending
                pending.text += output.text
                pending.ids += output.token_ids
                pending.logprobs += output.logprobs
                if output.prompt_logprobs is not None:
                    pending.prompt_logprobs = output.prompt_logprobs
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
        if tokens:
            self._metrics.generated_tokens.inc(tokens)

    def _write(self, now: float, final: bool) -> None:
        due = [
            p
            for p in self._pending.values()
            if p.end is not None or final or (p.text and now >= p.job.publish_due)
        ]
        if not due:
            return
        pipe = self._redis.pipeline(transaction=False)
        writes, ends = self._queue_writes(pipe, due)
        results = self._scripts.execute(pipe, raise_on_error=False) if len(pipe) else []
        self.round_trips += 1
        for result in results:
            if isinstance(result, redis.ReadOnlyError):  # a replica (failover): write it all again
                raise result
        for index, p in writes:
            self._delta_written(p, results[index - 1])
        for p in due:
            p.text, p.ids, p.counts_dirty = "", [], False
            p.job.publish_due = now + self._interval
            p.logprobs, p.prompt_logprobs = [], None
            if p.job.lost and p.end is not None:
                self._release(p, Answer.REQUEUED if p.job.handed_back else "lost")
        for index, p, status in ends:
            if p.job in self._pending:
                self._end_written(p, status, results[index - 1])

    def _queue_writes(
        self, pipe: redis.client.Pipeline, due: list[_Pending]
    ) -> tuple[list[tuple[int, _Pending]], list[tuple[int, _Pending, str]]]:
        """Put each due job's output write and end in ``pipe``; say where each one's reply is."""
        writes: list[tuple[int, _Pending]] = []
        ends: list[tuple[int, _Pending, str]] = []
        finished_at = time.time()
        for p in due:
            job = p.job
            if job.lost:
                continue
            # A run's last output goes with its end, in the same script (a handback's does not).
            last_goes_with_end = p.end is not None and p.end.finish_reason != HANDBACK and bool(job.run)
            if (
                job.run
                and not last_goes_with_end
                and (p.text or p.ids or p.counts_dirty or p.prompt_logprobs is not None)
            ):  # only a started run writes output
                delta = scripts.delta(
                    job.job_id,
                    run=job.run,
                    maxlen=self._maxlen,
                    text=p.text,
                    prompt_tokens=job.prompt_tokens,
                    completion_tokens=job.completion_tokens,
                    stored=p.stored,
                    token_ids=p.ids,
                    logprobs=p.logprobs,
                    prompt_logprobs=p.prompt_logprobs,
                    queue_list=keys.rq_queue(job.model) if job.model else None,
                )
                self._scripts.run(delta, client=pipe)
                writes.append((len(pipe), p))
            if p.end is not None:
                status, index = self._queue_end(pipe, p, finished_at)
                ends.append((index, p, status))
        return writes, ends

    def _delta_written(self, p: _Pending, result: Any) -> None:
        """What the *delta* script answered for ``p``'s output."""
        if isinstance(result, Exception):
            self._refused(p, result)
            return
        p.stored += len(p.ids)  # in Redis now (written by this or an earlier try)
        flag = int(result)
        if flag == DeltaAnswer.CANCEL_ASKED:
            p.job.cancel.set()
        elif flag == DeltaAnswer.NOT_HELD:  # another run holds the job now (this worker was thought dead)
            if p.end is not None and p.end.finish_reason == HANDBACK:
                return  # or this handback applied already: its own answer tells which
            p.job.lost = True
            p.job.cancel.set()
        elif flag == DeltaAnswer.GAP:  # the script handed the job back
            self._lost_writes(p)

    def _end_written(self, p: _Pending, status: str, result: object) -> None:
        """What the end's script answered for ``p`` (``status``: the end it asked for)."""
        if isinstance(result, Exception):
            self._end_refused(p, result)
            return
        answer = scripts.answer(result)
        if status == Answer.REQUEUED and answer == JobStatus.QUEUED:
            # Queued already: this handback sent again after its reply was lost (the write
            # applied), or a janitor's requeue: either way back on its queue.
            answer = Answer.REQUEUED
        if answer == Answer.REQUEUED and status != Answer.REQUEUED:  # the end found a gap
            self._lost_writes(p)
            self._release(p, Answer.REQUEUED)
        else:
            self._release(p, status if answer in (Answer.OK, Answer.REQUEUED) else answer)

    @staticmethod
    def _lost_writes(p: _Pending) -> None:
        """A script found that Redis lost this run's last writes, and handed the job back."""
        log.warning(
            "job %s: Redis lost this run's last output (a failover?); handed back, to be "
            "continued from what Redis kept",
            p.job.job_id,
        )
        p.job.lost = p.job.handed_back = True
        p.job.cancel.set()

    def _queue_end(self, pipe: Any, p: _Pending, finished_at: float) -> tuple[str, int]:
        """Queue the script that ends the job (or hands it back), with the run's last output;
        returns the status it aims for and the script's place in the pipeline (1-based)."""
        end = p.end
        assert end is not None
        job = end.job
        if end.finish_reason == HANDBACK:
            handback = scripts.requeue(
                job.job_id,
                maxlen=self._maxlen,
                ttl=self._result_ttl,
                attempts_allowed=0,
                run=job.run,
                queue_list=keys.rq_queue(job.model) if job.model else None,
            )
            self._scripts.run(handback, client=pipe)
            return Answer.REQUEUED, len(pipe)
        ending = final_record(end, finished_at)
        last = None
        if job.run:
            last = scripts.LastOutput(
                stored=p.stored,
                text=p.text,
                logprobs=p.logprobs,
                prompt_logprobs=p.prompt_logprobs,
                queue_list=keys.rq_queue(job.model) if job.model else None,
            )
            counts: dict[str, Any] = {JobField.PROMPT_TOKENS: job.prompt_tokens}
            counts[JobField.COMPLETION_TOKENS] = job.completion_tokens
            ending = replace(ending, fields={**ending.fields, **counts})
        finish = scripts.finish(
            job.job_id, ending, ttl=self._result_ttl, maxlen=self._maxlen, run=job.run, last=last
        )
        self._scripts.run(finish, client=pipe)
        status = ending.status
        index = len(pipe)
        if job.model:  # the model's drain rate: jobs ended per second (admission control)
            pipe.zadd(keys.drained(job.model), {f"{finished_at:.6f}:{os.urandom(3).hex()}": finished_at})
            if finished_at - self._trimmed.get(job.model, 0.0) >= DRAIN_TRIM_EVERY:
                self._trimmed[job.model] = finished_at
                pipe.zremrangebyscore(keys.drained(job.model), "-inf", finished_at - DRAIN_WINDOW)
                pipe.expire(keys.drained(job.model), int(DRAIN_WINDOW) + 60)
        return status, index

    def _release(self, p: _Pending, status: str) -> None:
        p.job.status = status
        p.job.error = p.end.error_message if p.end is not None else ""
        p.job.error_type = p.end.error_type if p.end is not None else ""
        self._pending.pop(p.job, None)
        p.job.ended.set()
