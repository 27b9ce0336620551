"""Backends that cannot batch (ChatGLM's own ``stream_chat``): each job runs its own iterator.

Every engine step advances each held job by one of its steps, so K jobs share the worker
fairly (one job per slot, unbatched), a cancel still takes effect within one step, and the
jobs go through the same publisher as batched ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

from shared.limits import InvalidJobRequest
from worker.backend import ChatBackend, GenerationStep
from worker.engine import CannotContinue, EngineJob, JobOutput, StepFailed, ended, refused

log = logging.getLogger("streamq.worker")


class SerialModel:
    engine = "transformers"
    features: frozenset[str] = frozenset()  # no penalties, logit bias or structured output

    def __init__(self, backend: ChatBackend, slots: int) -> None:
        self.backend = backend
        self.slots = slots
        self._steps: dict[EngineJob, Iterator[GenerationStep]] = {}

    def prepare(self, job: EngineJob) -> None:
        """Nothing to set up outside the engine thread."""

    def add(self, job: EngineJob) -> None:
        if job.resume_ids:  # not the client's request at fault: a 502 the client may send again
            raise CannotContinue(
                "this model runs through its own stream_chat, which cannot continue an answer "
                "another worker began; the job's worker was lost: send the request again"
            )
        self._steps[job] = self.backend.generate(job.request)

    def remove(self, job: EngineJob) -> None:
        steps = self._steps.pop(job, None)
        if steps is not None:
            steps.close()  # type: ignore[attr-defined]

    def ready_in(self) -> float | None:
        return 0.0 if self._steps else None

    def step(self) -> list[JobOutput]:
        """One step of each held job. A job whose step raises fails alone, while another job's
        step runs; when every held job's step raised, the step as a whole failed and raises (the
        engine fails them all, then checks with a job of its own whether the model still runs, as
        after a batched model's failed step), so a lost GPU stops the worker here too."""
        outputs = []
        failures: list[str] = []  # what each failed, not the exceptions: their frames hold memory
        for job, steps in list(self._steps.items()):
            try:
                step = next(steps, None)
            except InvalidJobRequest as exc:
                self._steps.pop(job)
                outputs.append(refused(job, exc))
                continue
            except Exception as exc:
                log.exception("job %s: its step failed", job.job_id)
                self._steps.pop(job)
                failures.append(f"{type(exc).__name__}: {exc}")
                outputs.append(ended(job, "error", "generation_error", failures[-1]))
                continue
            if step is None:  # ended without saying why: an answer that simply stopped
                self._steps.pop(job)
                outputs.append(ended(job, "stop"))
                continue
            job.prompt_tokens, job.completion_tokens = step.prompt_tokens, step.completion_tokens
            outputs.append(
                JobOutput(job, step.delta, step.prompt_tokens, step.completion_tokens, step.finish_reason)
            )
            if step.finish_reason is not None:
                self.remove(job)
        if failures and len(failures) == len(outputs):
            raise StepFailed(failures[0])
        return outputs
