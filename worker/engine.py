"""The generation engine: one thread per worker process that runs every job it holds, step by step.

Job threads (one per job being run, see ``dispatcher``) hand jobs in with ``submit`` and
wait for their end. Each engine step:

1. takes the jobs that arrived (they join between steps; none waits for a running one),
2. drops jobs that were canceled or ran past their deadline (their rows are freed at once),
3. runs one step of the model over all the jobs it holds (``BatchModel.step``: for a
   transformers model, one forward pass over the batch),
4. hands every job's new text to the publisher, which writes all of it in one round trip.

The model is only ever touched from this thread.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from shared.limits import InvalidJobRequest
from shared.logprobs import TokenLogprob
from shared.schemas import ChatMessage, GenerationRequest

if TYPE_CHECKING:
    from worker.answer_tokens import AnswerTokens

log = logging.getLogger("streamq.worker")


class AnswerEnded(Exception):
    """Replaying a job's earlier tokens ended its answer here: the last token finished a stop
    sequence (the earlier run's end was lost), or they fill this worker's smaller budget. The
    job ends with that finish reason and no new text."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class CannotContinue(Exception):
    """This engine cannot continue the job from its earlier run's tokens: it ends failed, with
    this reason (a continuation that went on would break the answer)."""


@dataclass(eq=False)
class EngineJob:
    """One job inside the engine, from submit to its final state in Redis."""

    job_id: str
    request: GenerationRequest
    created_at: float  # unix time the job was submitted
    started_at: float  # unix time this run started
    deadline: float  # monotonic time after which it stops with finish_reason "timeout"
    cancel: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)  # set once its end is written
    model: str = ""
    run: str = ""  # the run id that holds the job's lease (see START_SCRIPT)
    resume_ids: list[int] = field(default_factory=list)  # tokens an earlier run generated
    first_started_at: float | None = None  # unix time its first run started (None: this one)
    status: str = ""  # how it ended here: finished, canceled, failed, requeued (handed back), lost
    error: str = ""
    error_type: str = ""  # its failure's type (invalid_request_error: the request's fault)
    lost: bool = False  # another run holds the job now: write nothing more for it
    handed_back: bool = False  # lost because Redis lost its last output: back in its queue
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_at: float | None = None
    # The prompt's token ids, rendered by its job thread (``BatchModel.prepare``) so that a long
    # chat template (tools) never stalls the running jobs, or what rendering it raised.
    prompt_ids: list[int] | None = None
    prompt_error: Exception | None = None

    def rendered_prompt(self) -> list[int] | None:
        """The prompt its job thread rendered, handed over once (the model keeps its own copy);
        None if none was (the engine renders it); raises what rendering it raised."""
        if self.prompt_error is not None:
            raise self.prompt_error
        ids, self.prompt_ids = self.prompt_ids, None
        return ids

    publish_due: float = 0.0  # monotonic time its next output write is due (set by the publisher)


@dataclass(frozen=True)
class JobOutput:
    """What one step did for one job: new text, counts, and its end when it ended."""

    job: EngineJob
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None  # stop, length, timeout, canceled, error, handback
    error_type: str = ""
    error_message: str = ""
    error_param: str | None = None  # the request field an invalid_request_error is about
    error_code: str | None = None  # OpenAI's code for it, where it has one
    token_ids: tuple[int, ...] = ()  # the tokens behind ``text`` (kept for a continuation)
    logprobs: tuple[TokenLogprob, ...] = ()  # per token of ``token_ids`` (and an ending EOS), if asked
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # once, when the job asked


# The finish reason of a job a stopping engine gives back, for its queue (never a job's own end).
HANDBACK = "handback"


def resume(job: EngineJob, answer: AnswerTokens) -> None:
    """Replay into ``answer`` the tokens an earlier run of the job generated (their text was
    sent), so that it goes on from there; AnswerEnded when they end the answer here."""
    for token in job.resume_ids:
        answer.push(token)
        if answer.finish_reason is not None:  # e.g. a smaller budget here than the earlier run's
            break
    job.completion_tokens = answer.completion_tokens
    if answer.finish_reason is not None:
        raise AnswerEnded(answer.finish_reason)


def ended(
    job: EngineJob,
    reason: str,
    error_type: str = "",
    message: str = "",
    param: str | None = None,
    code: str | None = None,
) -> JobOutput:
    return JobOutput(
        job, "", job.prompt_tokens, job.completion_tokens, reason, error_type, message, param, code
    )


def refused(job: EngineJob, exc: InvalidJobRequest) -> JobOutput:
    """The end of a job its request cannot be served for: a 400 naming the field, OpenAI's code."""
    return ended(job, "error", "invalid_request_error", str(exc), exc.param, exc.code)


class BatchModel(Protocol):
    """What the engine drives: a model that holds up to ``slots`` jobs and advances them together."""

    slots: int
    engine: str  # its name, as workers announce it: transformers, vllm, synthetic
    features: frozenset[str]  # the ENGINE_FEATURES it offers (shared.schemas)

    def prepare(self, job: EngineJob) -> None:
        """Slow set-up of a job that may run outside the engine thread (a job thread calls it
        before ``submit``): rendering its prompt, compiling its grammar; either would stall every
        running job. It raises nothing: ``add`` raises what it met, as if it had met it itself."""
        ...

    def add(self, job: EngineJob) -> None:
        """Take a job (InvalidJobRequest when it cannot be served, e.g. it does not fit)."""
        ...

    def remove(self, job: EngineJob) -> None:
        """Drop a job before its end (a cancel or a deadline) and free what it held."""
        ...

    def step(self) -> list[JobOutput]:
        """Advance the jobs held; a job whose output has ``finish_reason`` set is gone from the model."""
        ...

    def ready_in(self) -> float | None:
        """Seconds until ``step`` has work (0: now), or None when the model holds no job."""
        ...


def refuse_missing_features(request: GenerationRequest, model: BatchModel) -> None:
    """InvalidJobRequest naming the first field the request needs that this engine cannot do (the
    front refuses such a request already; a job queued with no live worker to ask reaches here)."""
    for feature, field_name in request.engine_features().items():
        if feature not in model.features:
            raise InvalidJobRequest(
                f"'{field_name}' is not supported by this model's {model.engine} engine "
                "(the transformers and vLLM engines offer it)",
                param=field_name,
            )


class OutputSink(Protocol):
    def put(self, outputs: list[JobOutput]) -> None: ...


STOP_WAIT = 300.0  # a step in flight (a long prefill on a CPU) is let finish before the jobs end
PROBE = "engine-probe"  # the job id of the engine's own check after a failed step


class StepFailed(RuntimeError):
    """A step failed as a whole, raised anew with its cause's "Type: message" only (not its frames)."""


class EngineBroken(RuntimeError):
    """The engine cannot run a job any more (its GPU lost, vLLM's executor dead): its unstarted
    jobs go back to their queue and the worker stops, for its supervisor to start it again."""


class Engine:
    """Runs in the thread that loaded the model: ``run()`` there (a worker's main thread), or
    ``start()`` for a thread of its own. On the CPU, torch work from a second thread is slow (its
    own OpenMP team: 3x slower at 2 threads), so a worker runs it where the model was loaded."""

    thread_name = "streamq-engine"

    def __init__(
        self, model: BatchModel, sink: OutputSink, on_step: Callable[[float], None] | None = None
    ) -> None:
        self.model = model
        self._sink = sink
        self._on_step = on_step  # given each model step's duration (seconds): one call per step
        self._inbox: queue.SimpleQueue[EngineJob | None] = queue.SimpleQueue()
        # Closed once the engine has taken its last arrivals: a job submitted later (its thread
        # was still starting it) is refused, and handed back by that thread, not left unread.
        self._closed = False
        self._closing = threading.Lock()
        self._jobs: set[EngineJob] = set()
        self._stopping = threading.Event()
        self._running = threading.Event()
        self._thread: threading.Thread | None = None
        self.steps = 0

    @property
    def slots(self) -> int:
        return self.model.slots

    def start(self) -> None:
        """Run in a thread of its own."""
        self._running.set()
        self._thread = threading.Thread(target=self.run, name=self.thread_name, daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Stop stepping soon; jobs still held are handed back to their queue, for another worker."""
        self._stopping.set()
        self._inbox.put(None)

    def stop(self) -> None:
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout=STOP_WAIT)

    def submit(self, job: EngineJob) -> bool:
        """Hand the engine a job; False once it has stopped (the caller hands the job back)."""
        with self._closing:
            if self._closed:
                return False
            self._inbox.put(job)
            return True

    def _close(self) -> list[EngineJob]:
        """Take no more jobs: the jobs held and those that arrived since the last step."""
        with self._closing:
            self._closed = True
            return list(self._jobs) + self._arrivals(0)

    def run(self) -> None:
        """Step until ``request_stop`` (in the calling thread)."""
        self._running.set()
        try:
            while not self._stopping.is_set():
                self._step()
            left = self._close()
            self._sink.put([ended(j, HANDBACK) for j in left])
            self._jobs.clear()
        except EngineBroken:
            log.exception("the engine is broken: the worker stops")
            self._sink.put([ended(j, HANDBACK) for j in self._close()])  # not theirs: for another worker
            self._jobs.clear()
            raise
        except BaseException:
            log.exception("the engine stopped on an error")
            left = self._close()
            self._sink.put([ended(j, "error", "worker_stopped", "the worker's engine failed") for j in left])
            self._jobs.clear()
            raise
        finally:  # after the jobs' ends are handed over: a slot that sees this waits for them
            self._running.clear()

    def alive(self) -> bool:
        return self._running.is_set()

    def stopping(self) -> bool:
        return self._stopping.is_set()

    def _step(self) -> None:
        outputs: list[JobOutput] = []
        broken = recheck = False
        wait = self.model.ready_in()
        for job in self._arrivals(wait):
            try:
                refuse_missing_features(job.request, self.model)
                self.model.add(job)
                self._jobs.add(job)
            except InvalidJobRequest as exc:
                outputs.append(refused(job, exc))
            except AnswerEnded as exc:
                outputs.append(ended(job, exc.reason))
            except CannotContinue as exc:
                log.warning("job %s cannot be continued here: %s", job.job_id, exc)
                outputs.append(ended(job, "error", "generation_error", str(exc)))
            except Exception as exc:  # e.g. a prompt its tokenizer cannot take
                log.exception("job %s could not join the engine", job.job_id)
                outputs.append(ended(job, "error", "generation_error", f"{type(exc).__name__}: {exc}"))
        outputs += self._drop_stopped()
        if self._jobs and self.model.ready_in() == 0:
            began = time.perf_counter()
            failure = None
            try:
                outputs += self.model.step()
            except Exception as exc:  # a bad step fails the jobs it held, not the worker
                log.exception("a generation step failed")
                failure = str(exc) if isinstance(exc, StepFailed) else f"{type(exc).__name__}: {exc}"
            # Out of the except block: the failed step's frames (and the memory they held) are gone.
            if failure is not None:
                held = list(self._jobs)
                outputs += [ended(job, "error", "generation_error", failure) for job in held]
                recheck = self._removed(held)  # else broken: the model could not even let them go
                broken = not recheck
            self.steps += 1
            if self._on_step is not None:
                self._on_step(time.perf_counter() - began)
        for output in outputs:
            if output.finish_reason is not None:
                self._jobs.discard(output.job)
        if outputs:
            self._sink.put(outputs)
        if recheck and not self._runs_a_job():  # after the failed jobs' ends are on their way
            broken = True
        if broken:
            raise EngineBroken("a generation step failed, and so did the engine's own two-token job after it")

    def _removed(self, jobs: list[EngineJob]) -> bool:
        """Take the jobs of a failed step out of the model; False when that fails as well."""
        try:
            for job in jobs:
                self.model.remove(job)
        except Exception:
            log.exception("the jobs of a failed step could not be taken out of the engine")
            return False
        return True

    def _runs_a_job(self) -> bool:
        """After a failed step: whether the model still runs a two-token job of the engine's own (a
        request that breaks every step it joins leaves a well engine; a lost GPU fails this)."""
        request = GenerationRequest(
            messages=[ChatMessage(role="user", content="hi")], max_tokens=2, temperature=0.0, top_p=1.0
        )
        now = time.time()
        probe = EngineJob(PROBE, request, now, now, time.monotonic() + 60)
        try:
            self.model.add(probe)
            for _ in range(16):  # two tokens: a prefill and a decode step or two, with room to spare
                time.sleep(min(self.model.ready_in() or 0.0, 1.0))  # a paced model's next token
                if any(
                    out.job is probe and out.finish_reason in ("stop", "length") for out in self.model.step()
                ):
                    return True
            return False
        except Exception:
            log.exception("the engine's own job failed after a failed step")
            return False
        finally:
            with contextlib.suppress(Exception):
                self.model.remove(probe)

    def _arrivals(self, wait: float | None) -> list[EngineJob]:
        """New jobs: waits for one while there is nothing to compute (at most ``wait`` seconds)."""
        arrived: list[EngineJob] = []
        try:
            if wait is None or wait > 0:
                job = self._inbox.get(timeout=min(wait, 1.0) if wait is not None else 1.0)
                if job is not None:
                    arrived.append(job)
            while True:
                job = self._inbox.get_nowait()
                if job is not None:
                    arrived.append(job)
        except queue.Empty:
            pass
        return arrived

    def _drop_stopped(self) -> list[JobOutput]:
        outputs = []
        now = time.monotonic()
        for job in list(self._jobs):
            if job.lost:
                reason = "lost"
            elif job.cancel.is_set():
                reason = "canceled"
            elif now >= job.deadline:
                reason = "timeout"
            else:
                continue
            self.model.remove(job)
            self._jobs.discard(job)
            outputs.append(ended(job, reason))
        return outputs
