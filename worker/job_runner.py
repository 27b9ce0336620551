"""Running one job: start it, stream its steps to Redis, stop on cancel, write its end once."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import redis
from rq.timeouts import JobTimeoutException

from shared import keys
from shared.job_state import (
    EVENT_CANCELED,
    EVENT_DONE,
    EVENT_ERROR,
    START_SCRIPT,
    encode,
)
from shared.limits import InvalidJobRequest
from shared.schemas import GenerationRequest
from shared.settings import Settings
from worker.backend import ChatBackend
from worker.cancel_watcher import CancelWatcher
from worker.publisher import JobPublisher

log = logging.getLogger("streamq.worker")

CANCELED = "canceled"
FINISHED = "finished"


class JobFailed(Exception):
    """Raised after a job's failure is recorded in its state, so that RQ files it as failed too."""


def _decode(mapping: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in mapping.items()
    }


class JobRunner:
    def __init__(
        self,
        connection: redis.Redis,
        backend: ChatBackend,
        settings: Settings,
        cancel_watcher: CancelWatcher,
        worker_name: str,
    ) -> None:
        self._redis = connection
        self._backend = backend
        self._settings = settings
        self._cancels = cancel_watcher
        self._worker_name = worker_name
        self._start = connection.register_script(START_SCRIPT)

    def run(self, job_id: str) -> str:
        """Run the job to its end; returns its final status ("finished" or "canceled").

        Raises JobFailed (or the original exception) when it failed, after recording why.
        """
        fields = _decode(self._redis.hgetall(keys.job(job_id)))
        if not fields:
            raise JobFailed(f"job {job_id} has no state in Redis (expired or deleted)")
        request = GenerationRequest.model_validate_json(fields["request"])
        created_at = float(fields["created_at"])
        started_at = time.time()
        publisher = JobPublisher(self._redis, job_id, self._settings)
        waited = started_at - created_at
        if waited > self._settings.queue_ttl:
            limit = self._settings.queue_ttl
            message = f"the job waited {waited:.0f} s in its queue, longer than the limit of {limit} s"
            self._fail(publisher, "expired", message)
            raise JobFailed(message)
        answer = self._start(
            keys=[keys.job(job_id), keys.events(job_id)],
            args=[
                self._worker_name,
                started_at,
                self._settings.stream_maxlen,
                encode({"worker": self._worker_name}),
            ],
        )
        answer = answer.decode() if isinstance(answer, bytes) else str(answer)
        if answer == "cancel":
            return self._cancel(publisher)
        if answer != "running":
            log.info("job %s: not started, its state is %s", job_id, answer)
            return answer
        log.info("job %s: started on %s (waited %.3fs)", job_id, self._worker_name, started_at - created_at)
        cancel = self._cancels.watch(job_id)
        try:
            finish_reason = self._generate(request, publisher, cancel)
        except InvalidJobRequest as exc:
            self._fail(publisher, "invalid_request_error", str(exc))
            raise JobFailed(str(exc)) from exc
        except JobTimeoutException as exc:
            self._fail(publisher, "timeout", f"the job ran longer than its limit: {exc}")
            raise
        except Exception as exc:
            self._fail(publisher, "generation_error", f"{type(exc).__name__}: {exc}")
            raise
        except BaseException:
            self._fail(publisher, "worker_stopped", "the worker stopped while running this job")
            raise
        finally:
            self._cancels.unwatch(job_id)
        if finish_reason is None:
            return self._cancel(publisher)
        finished_at = time.time()
        first = publisher.first_token_at
        timings = {
            "queue_seconds": round(started_at - created_at, 6),
            "first_token_seconds": round(first - started_at, 6) if first else None,
            "generation_seconds": round(finished_at - started_at, 6),
            "tokens_per_second": (
                round(publisher.completion_tokens / (finished_at - first), 3)
                if first and finished_at > first
                else None
            ),
        }
        usage = {"prompt_tokens": publisher.prompt_tokens, "completion_tokens": publisher.completion_tokens}
        publisher.finish(
            FINISHED,
            EVENT_DONE,
            {"finish_reason": finish_reason, "usage": usage, "timings": timings},
            {"finish_reason": finish_reason, "finished_at": finished_at},
        )
        log.info(
            "job %s: finished (%s), %d tokens in %.3fs",
            job_id,
            finish_reason,
            publisher.completion_tokens,
            finished_at - started_at,
        )
        return FINISHED

    def _generate(
        self, request: GenerationRequest, publisher: JobPublisher, cancel: threading.Event
    ) -> str | None:
        """Stream the steps; the finish reason, or None when a cancel stopped it."""
        steps = self._backend.generate(request)
        try:
            for step in steps:
                publisher.add(step.delta, step.prompt_tokens, step.completion_tokens)
                if step.finish_reason is not None:
                    return step.finish_reason
                if cancel.is_set() or publisher.cancel_requested:
                    return None
        finally:
            steps.close()  # type: ignore[attr-defined]
        return "stop"

    def _cancel(self, publisher: JobPublisher) -> str:
        publisher.finish(
            CANCELED,
            EVENT_CANCELED,
            {"completion_tokens": publisher.completion_tokens},
            {"finish_reason": "canceled", "finished_at": time.time()},
        )
        return CANCELED

    def _fail(self, publisher: JobPublisher, error_type: str, message: str) -> None:
        publisher.finish(
            "failed",
            EVENT_ERROR,
            {"type": error_type, "message": message},
            {
                "finish_reason": "error",
                "finished_at": time.time(),
                "error_type": error_type,
                "error_message": message,
            },
        )
