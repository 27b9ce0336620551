"""The scripts that move a job's state: each one's typed call builder, and their registration.

A job's life, as these scripts write it (``vocabulary.py`` names the words, ``payloads.py`` the
events' data, ``records.py`` the job's hash):

1. The front creates the job with ``submit``, one script: a key's concurrency quota and the
   model's queue limit admit it, then its hash (status ``queued``) and ``queued`` event, RQ's
   record of the job (as RQ's own enqueue writes it, ``rq_records.py``) and the id on the
   model's RQ queue are written together.
2. A worker's slot takes it from RQ and ``start``s it: status ``running`` under a new run id,
   which holds the job's lease (``renew`` keeps it while the run lives).
3. The run's output goes out through ``delta`` (text, token ids, counts, fenced by the run id),
   and its end through ``finish`` (exactly once: a late writer finds the job final).
4. A stopping worker hands the job back (``requeue`` with its run id); the janitor does the same
   for a run whose lease lapsed (``requeue`` without one), until its attempts are used up.
5. A client's ``cancel`` ends a job no run holds at once, and flags a running one for its run.

The Lua source of each is in ``lua_sources.py``. Every script is registered once per connection
(``JobScripts``) and called with the KEYS and ARGV its builder makes, so the order of its
arguments is written in one place; ``answers.py`` names what they answer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from shared import keys
from shared.job_store import lua_sources
from shared.job_store.answers import Answer as Answer
from shared.job_store.answers import DeltaAnswer as DeltaAnswer
from shared.job_store.answers import RenewAnswer as RenewAnswer
from shared.job_store.answers import answer as answer
from shared.job_store.payloads import Canceled, Delta, Failed, Payload, Started
from shared.job_store.vocabulary import EventName, FinishReason, JobField, JobStatus
from shared.logprobs import TokenLogprob


@dataclass(frozen=True)
class Lua:
    name: str
    source: str


@dataclass(frozen=True)
class ScriptCall:
    """One call of a script: what ``JobScripts.run`` sends."""

    script: Lua
    keys: list[str]
    args: list[Any]


START = Lua("start", lua_sources.START)
DELTA = Lua("delta", lua_sources.DELTA)
RENEW = Lua("renew", lua_sources.RENEW)
FINISH = Lua("finish", lua_sources.FINISH)
REQUEUE = Lua("requeue", lua_sources.REQUEUE)
CANCEL = Lua("cancel", lua_sources.CANCEL)
SUBMIT = Lua("submit", lua_sources.SUBMIT)
TAKE = Lua("take", lua_sources.TAKE)
PUT_BACK = Lua("put_back", lua_sources.PUT_BACK)
FORGET = Lua("forget", lua_sources.FORGET)  # api.idempotent_jobs

SCRIPTS: tuple[Lua, ...] = (SUBMIT, START, DELTA, RENEW, FINISH, REQUEUE, CANCEL, TAKE, PUT_BACK, FORGET)


class ScriptsReloaded(RedisConnectionError):
    """Redis had lost the scripts (it restarted empty, or a replica without them took over): they
    are loaded again, and nothing of the pipeline that found them missing was applied by a
    script. Raised as a connection error, so that the caller's retry writes it all again."""


class JobScripts:
    """The scripts registered on one redis-py connection, synchronous or asyncio.

    ``run`` returns the answer (an awaitable of it on an asyncio connection), by EVALSHA, loading
    the script first if Redis lacks it. With ``client=`` a pipeline, it queues the EVALSHA
    there: run that pipeline with ``execute`` (or ``execute_async``), which turns a missing script
    into ``ScriptsReloaded``. (redis-py's own scripts in a pipeline ask SCRIPT EXISTS for each of
    them on every execute.)"""

    def __init__(self, connection: Any) -> None:
        self._connection = connection
        self._registered = {script.name: connection.register_script(script.source) for script in SCRIPTS}

    def run(self, call: ScriptCall, client: Any = None) -> Any:
        script = self._registered[call.script.name]
        if client is None:
            return script(keys=call.keys, args=call.args)
        return client.evalsha(script.sha, len(call.keys), *call.keys, *call.args)

    def execute(self, pipe: Any, raise_on_error: bool = True) -> list[Any]:
        """``pipe.execute()``; ScriptsReloaded (after loading them) when a script was missing. With
        ``raise_on_error=False``, a command Redis refused answers its error in its place (as
        redis-py's pipeline gives it) and the others' answers stand: a pipeline is not a
        transaction, so the commands before and after a refused one did run."""
        try:
            results: list[Any] | None = list(pipe.execute(raise_on_error=raise_on_error))
        except NoScriptError:
            results = None
        if results is None or any(isinstance(result, NoScriptError) for result in results):
            for script in SCRIPTS:
                self._connection.script_load(script.source)
            raise ScriptsReloaded("Redis had lost streamq's scripts; loaded again")
        return results

    async def execute_async(self, pipe: Any) -> list[Any]:
        """``execute`` for a pipeline of an asyncio connection."""
        try:
            return list(await pipe.execute())
        except NoScriptError:
            for script in SCRIPTS:
                await self._connection.script_load(script.source)
            raise ScriptsReloaded("Redis had lost streamq's scripts; loaded again") from None


def take(queue_list: str, most: int) -> ScriptCall:
    return ScriptCall(TAKE, [queue_list, keys.intermediate(queue_list)], [most])


def put_back(queue_list: str, job_ids: list[str], unlisted: bool = False) -> ScriptCall:
    """Ids taken and never begun back to their queue's head; ``unlisted``: one on neither the
    queue nor its intermediate list too (taken by a plain RQ worker)."""
    flag = "1" if unlisted else "0"
    return ScriptCall(PUT_BACK, [queue_list, keys.intermediate(queue_list)], [flag, *job_ids])


def _pairs(fields: Mapping[str, Any]) -> list[Any]:
    return [item for name, value in fields.items() if value is not None for item in (name, value)]


def _ending_keys(job_id: str) -> list[str]:
    return [
        keys.job(job_id),
        keys.events(job_id),
        keys.text(job_id),
        keys.tokens(job_id),
        keys.lease(job_id),
        keys.RUNNING,
    ]


def start(
    job_id: str,
    *,
    worker: str,
    slot: str,
    run: str,
    now: float,
    attempt: int,
    lease_ms: int,
    maxlen: int,
    taken_into: str | None = None,
) -> ScriptCall:
    """Start the job under ``run`` on ``worker`` (``slot`` and ``attempt`` go in its event);
    ``taken_into``: the intermediate list the job's id waits in until this start."""
    data = Started(worker=slot, attempt=attempt).encode()
    job_keys = [keys.job(job_id), keys.events(job_id), keys.lease(job_id), keys.RUNNING, keys.tokens(job_id)]
    return ScriptCall(
        START,
        job_keys + ([taken_into] if taken_into else []),
        [worker, now, maxlen, data, run, lease_ms, job_id],
    )


def started(reply: Any) -> tuple[str, list[int]]:
    """``start``'s answer, and the token ids an earlier run of the job stored (to continue from)."""
    answer_, ids = reply
    return answer(answer_), [int(token) for token in ids]


def _delta_event(
    text: str, logprobs: Sequence[TokenLogprob], prompt_logprobs: Sequence[TokenLogprob] | None
) -> str:
    """The ``delta`` event's data for some output ("" when it has nothing a client reads)."""
    if not (text or logprobs or prompt_logprobs is not None):
        return ""
    event = Delta(text=text)
    if logprobs:
        event.logprobs = list(logprobs)
    if prompt_logprobs is not None:
        event.prompt_logprobs = list(prompt_logprobs)
    return event.encode()


def delta(
    job_id: str,
    *,
    run: str,
    maxlen: int,
    text: str,
    prompt_tokens: int,
    completion_tokens: int,
    stored: int,
    token_ids: Sequence[int],
    logprobs: Sequence[TokenLogprob] = (),
    prompt_logprobs: Sequence[TokenLogprob] | None = None,
    queue_list: str | None = None,
) -> ScriptCall:
    """Write ``run``'s new output: ``text`` (a ``delta`` event, when not empty, or when it has
    ``logprobs`` or ``prompt_logprobs``), the counts, and ``token_ids`` after the ``stored`` ones
    already in Redis (a write sent twice applies once; fewer stored than ``stored``: Redis lost
    some, and the job goes back to the front of ``queue_list``, its model's RQ queue)."""
    data = _delta_event(text, logprobs, prompt_logprobs)
    args = [run, maxlen, data, text, prompt_tokens, completion_tokens, stored, job_id, *token_ids]
    job_keys = [keys.job(job_id), keys.events(job_id), keys.text(job_id), keys.tokens(job_id)]
    job_keys += [keys.lease(job_id), keys.RUNNING]
    if queue_list is not None:
        job_keys.append(queue_list)
    return ScriptCall(DELTA, job_keys, args)


def renew(job_id: str, *, run: str, lease_ms: int) -> ScriptCall:
    return ScriptCall(RENEW, [keys.job(job_id), keys.lease(job_id)], [run, lease_ms])


@dataclass(frozen=True)
class Ending:
    """A job's final state: its status, its final event and the fields its hash gets."""

    status: JobStatus
    event: EventName
    data: Payload
    fields: Mapping[str, Any] = field(default_factory=dict)


def ended_failed(
    error_type: str,
    message: str,
    finished_at: float | None = None,
    param: str | None = None,
    code: str | None = None,
) -> Ending:
    fields: dict[str, Any] = {
        JobField.FINISH_REASON: FinishReason.ERROR,
        JobField.FINISHED_AT: finished_at if finished_at is not None else time.time(),
        JobField.ERROR_TYPE: error_type,
        JobField.ERROR_MESSAGE: message,
    }
    if param:
        fields[JobField.ERROR_PARAM] = param
    if code:
        fields[JobField.ERROR_CODE] = code
    extra = {name: value for name, value in (("param", param), ("code", code)) if value}
    failed = Failed(type=error_type, message=message, **extra)
    return Ending(JobStatus.FAILED, EventName.ERROR, failed, fields)


def ended_canceled(completion_tokens: int, finished_at: float | None = None) -> Ending:
    fields: dict[str, Any] = {
        JobField.FINISH_REASON: FinishReason.CANCELED,
        JobField.FINISHED_AT: finished_at if finished_at is not None else time.time(),
    }
    data = Canceled(completion_tokens=completion_tokens)
    return Ending(JobStatus.CANCELED, EventName.CANCELED, data, fields)


@dataclass(frozen=True)
class LastOutput:
    """A run's output not yet written when its job ends, written by ``finish`` in the same step
    (its token ids are not: a job's ids go with its end). ``stored``: the token ids the run has
    in Redis, checked there first (fewer: a failover lost some, and the job is handed back to
    ``queue_list``, its model's RQ queue, instead of ending with a hole)."""

    stored: int
    text: str = ""
    logprobs: Sequence[TokenLogprob] = ()
    prompt_logprobs: Sequence[TokenLogprob] | None = None
    queue_list: str | None = None


def finish(
    job_id: str, ending: Ending, *, ttl: int, maxlen: int, run: str = "", last: LastOutput | None = None
) -> ScriptCall:
    """End the job once, from ``run`` (or from no run: ``run`` ""), with the run's ``last`` output,
    and let its records live ``ttl``."""
    out_data = out_text = stored = ""
    job_keys = _ending_keys(job_id)
    if last is not None:
        out_data = _delta_event(last.text, last.logprobs, last.prompt_logprobs)
        out_text, stored = last.text, str(last.stored)
        if last.queue_list is not None:
            job_keys.append(last.queue_list)
    args = [
        ending.status,
        ending.event,
        ending.data.encode(),
        ttl,
        maxlen,
        run,
        job_id,
        out_data,
        out_text,
        stored,
        *_pairs(ending.fields),
    ]
    return ScriptCall(FINISH, job_keys, args)


def requeue(
    job_id: str,
    *,
    maxlen: int,
    ttl: int,
    attempts_allowed: int,
    failure: Failed | None = None,
    run: str = "",
    queue_list: str | None = None,
) -> ScriptCall:
    """Hand the job back to its queue (pushed onto ``queue_list``'s front in the same step): from a
    stopping ``run``, or from the janitor (no run) after its lease lapsed, failing it with
    ``failure`` once ``attempts_allowed`` runs were lost."""
    failure = failure or Failed(type="", message="")
    ending = ended_failed(failure.type, failure.message)
    now = ending.fields[JobField.FINISHED_AT]
    args = [job_id, maxlen, ttl, attempts_allowed, failure.encode(), now, *_pairs(ending.fields), run]
    return ScriptCall(REQUEUE, _ending_keys(job_id) + ([queue_list] if queue_list else []), args)


def cancel(
    job_id: str,
    model: str,
    *,
    ttl: int,
    maxlen: int,
    finished_at: float | None = None,
    withdrawn: bool = False,
) -> ScriptCall:
    """Cancel the job: ended here if no run holds it, else flagged for its run; ``withdrawn``:
    marked as a job its front withdrew, in the same step (its Idempotency-Key makes it anew)."""
    queue = keys.rq_queue(model)
    ending = ended_canceled(0, finished_at)
    return ScriptCall(
        CANCEL,
        [keys.job(job_id), keys.events(job_id), keys.text(job_id), queue, keys.intermediate(queue)],
        [job_id, ending.data.encode(), ttl, maxlen, "1" if withdrawn else "0", *_pairs(ending.fields)],
    )


@dataclass(frozen=True)
class Quota:
    """A key's concurrency quota, checked where the job is created: at most ``limit`` jobs of the
    key ``owner`` queued or running; its set lives ``life`` seconds past its last admission."""

    owner: str
    limit: int
    life: int


def submit(
    job_id: str,
    *,
    fields: Mapping[str, Any],
    rq_job: Mapping[str, Any],
    queue_list: str,
    max_queued: int,
    life: int,
    maxlen: int,
    queued_event: Payload,
    quota: Quota | None = None,
    now: float = 0.0,
) -> ScriptCall:
    """Create the job in one step: its hash ``fields`` and its ``queued`` event living ``life``
    seconds, RQ's record ``rq_job`` and its id at the back of ``queue_list``, unless the queue
    holds ``max_queued`` jobs already (0: no limit) or ``quota`` has its most."""
    job_keys = [keys.job(job_id), keys.events(job_id), keys.rq_job(job_id), queue_list, keys.RQ_QUEUES]
    pairs = _pairs(fields)
    quota_args: list[Any] = [0, 0, 0]
    if quota is not None:
        job_keys.append(keys.key_active(quota.owner))
        quota_args = [quota.limit, repr(now), quota.life]
    args = [job_id, max_queued, life, maxlen, queued_event.encode(), *quota_args, len(pairs), *pairs]
    return ScriptCall(SUBMIT, job_keys, args + _pairs(rq_job))
