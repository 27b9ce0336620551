"""Calling the job store's scripts in tests exactly as production calls them (through the typed
builders of ``shared.job_store.scripts``), on a job made the way the tests need it."""

from __future__ import annotations

import redis

from shared import keys
from shared.job_store import scripts
from shared.job_store.payloads import Failed
from shared.job_store.scripts import Ending, JobScripts
from shared.job_store.vocabulary import EventName, FinishReason, JobField, JobStatus
from shared.schemas import Timings, Usage
from tests.redis_replies import decoded_entries

LOST = Failed(type="worker_lost", message="gone")


def _new_job(r: redis.Redis, job_id: str, model: str = "m") -> list[str]:
    r.hset(keys.job(job_id), mapping={JobField.STATUS: JobStatus.QUEUED, JobField.MODEL: model})
    r.expire(keys.job(job_id), 300)
    r.rpush(keys.rq_queue(model), job_id)
    return [keys.job(job_id), keys.events(job_id), keys.text(job_id)]


def _events(r: redis.Redis, job_id: str) -> list[str]:
    return [fields["event"] for _, fields in decoded_entries(r.xrange(keys.events(job_id)))]


def _run(r: redis.Redis, call: scripts.ScriptCall) -> object:
    return JobScripts(r).run(call)


def _start_call(job_id: str, run: str, lease_ms: int = 5000) -> scripts.ScriptCall:
    return scripts.start(
        job_id, worker="w1", slot="w1.0", run=run, now=1.0, attempt=1, lease_ms=lease_ms, maxlen=100
    )


def _start(r: redis.Redis, job_id: str, run: str, lease_ms: int = 5000) -> str:
    return scripts.started(_run(r, _start_call(job_id, run, lease_ms)))[0]


def _delta(
    r: redis.Redis,
    job_id: str,
    run: str,
    text: str,
    ids: list[int],
    stored: int | None = None,
    queue: str | None = None,
) -> int:
    before = r.llen(keys.tokens(job_id)) if stored is None else stored
    call = scripts.delta(
        job_id,
        run=run,
        maxlen=100,
        text=text,
        prompt_tokens=3,
        completion_tokens=len(ids),
        stored=before,
        token_ids=ids,
        queue_list=queue,
    )
    return int(_run(r, call))  # type: ignore[call-overload]


def _done(reason: str = FinishReason.STOP) -> Ending:
    from shared.job_store.payloads import Done

    timings = Timings(queue_seconds=0, first_token_seconds=None, generation_seconds=1, tokens_per_second=None)
    done = Done(finish_reason=reason, usage=Usage(prompt_tokens=3, completion_tokens=2), timings=timings)
    return Ending(JobStatus.FINISHED, EventName.DONE, done, {JobField.FINISH_REASON: reason})


def _finish(r: redis.Redis, job_id: str, ending: Ending, run: str) -> str:
    return scripts.answer(_run(r, scripts.finish(job_id, ending, ttl=60, maxlen=100, run=run)))


def _cancel(r: redis.Redis, job_id: str, model: str = "m") -> str:
    return scripts.answer(_run(r, scripts.cancel(job_id, model, ttl=60, maxlen=100)))


def _requeue(r: redis.Redis, job_id: str, attempts: int = 3, run: str = "", queue: str | None = None) -> str:
    call = scripts.requeue(
        job_id, maxlen=100, ttl=60, attempts_allowed=attempts, failure=LOST, run=run, queue_list=queue
    )
    return scripts.answer(_run(r, call))
