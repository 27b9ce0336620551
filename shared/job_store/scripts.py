"""The Lua scripts that move a job's state, each next to the typed function that builds its call.

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

Every script is registered once per connection (``JobScripts``) and called with the KEYS and
ARGV its builder makes, so the order of its arguments is written in one place.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

from shared import keys
from shared.job_store.payloads import Canceled, Delta, Failed, Payload, Started
from shared.job_store.vocabulary import EventName, FinishReason, JobField, JobStatus
from shared.logprobs import TokenLogprob


class Answer(StrEnum):
    """What the scripts answer besides a job's final status (``JobStatus``)."""

    OK = "ok"  # finish, cancel: written
    RUNNING = "running"  # start: now running; cancel: flagged for the run that holds it
    CANCEL = "cancel"  # start: a cancel was asked before it started
    TAKEN = "taken"  # start: another run holds a live lease
    LOST = "lost"  # finish, requeue: another run holds the job
    ALIVE = "alive"  # requeue without a run: the lease is live
    REQUEUED = "requeued"  # requeue: back in its queue
    MISSING = "missing"  # the job's hash is gone
    QUEUE_FULL = "full"  # submit: the model's queue holds its most jobs
    QUOTA = "quota"  # submit: the caller's key has its most jobs queued or running


class DeltaAnswer(IntEnum):
    WRITTEN = 0
    CANCEL_ASKED = 1  # written; a cancel is pending
    NOT_HELD = -1  # this run no longer holds the job: nothing written, stop
    GAP = -2  # Redis lost this run's last writes (a failover): the job was handed back


class RenewAnswer(IntEnum):
    HELD = 1
    TAKEN = 0  # another run holds the job now
    GONE = -1  # the job's hash is gone (expired, or Redis lost its data)


def answer(value: Any) -> str:
    """A script's string answer, decoded (connections with and without decode_responses)."""
    return value.decode() if isinstance(value, bytes) else str(value)


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


# Moves a queued job to running under a new run id, and gives that run the job's lease; first,
# whatever it answers, takes the id off the RQ intermediate list it was taken into (KEYS[5],
# when given: until this step, a worker killed after taking the job leaves it there, for the
# janitor to queue again). KEYS: job hash, events, lease, running set[, intermediate list].
# ARGV: worker, now, maxlen, event data, run id, lease ms, job id. Returns "running", "cancel"
# (a cancel was asked before it started), "taken" (another run holds a live lease), "missing",
# or the job's final status.
_START = """
if KEYS[5] then redis.call('LREM', KEYS[5], 1, ARGV[7]) end
local job = redis.call('HMGET', KEYS[1], 'status', 'cancel', 'started_at', 'attempts')
local status = job[1]
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return status end
if job[2] then return 'cancel' end
if status == 'running' and redis.call('EXISTS', KEYS[3]) == 1 then return 'taken' end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'run', ARGV[5],
  'started_at', job[3] or ARGV[2], 'attempts', (tonumber(job[4]) or 0) + 1)
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[7])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', 'started', 'data', ARGV[4])
return 'running'
"""

# A running job's new output, written only by the run that holds it, and only once: ARGV[7] is
# how many token ids the job had stored before this write, so a round trip that is sent again
# (its reply was lost) finds them already there and writes nothing twice.
# The text and the token ids live as long as the job's hash: each gets its TTL from the hash
# once, when a write creates it (a finished job's end sets them all again).
# KEYS: job hash, events, text, tokens, lease, running set, and the model's RQ queue list. ARGV:
# run id, maxlen, delta event data (or "": no event), text (or ""), prompt tokens, completion
# tokens, token ids stored before, job id, then the new token ids.
# Returns 0, 1 (a cancel was asked), -1 (this run no longer holds the job: stop, write nothing),
# or -2 (fewer token ids are stored than this run wrote: a failover lost its last writes; the job
# goes back to its queue's front in the same step, as a handback does, to be continued from what
# Redis kept).
_DELTA = """
local job = redis.call('HMGET', KEYS[1], 'run', 'status', 'cancel', 'attempts')
if job[1] ~= ARGV[1] or job[2] ~= 'running' then return -1 end
local stored = redis.call('LLEN', KEYS[4])
if stored < tonumber(ARGV[7]) then  -- Redis lost the last writes of this run: hand the job back
  local attempts = (tonumber(job[4]) or 1) - 1  -- not a lost attempt
  redis.call('HSET', KEYS[1], 'status', 'queued', 'attempts', attempts)
  redis.call('HDEL', KEYS[1], 'run')
  redis.call('DEL', KEYS[5])
  redis.call('ZREM', KEYS[6], ARGV[8])
  if KEYS[7] then redis.call('LPUSH', KEYS[7], ARGV[8]) end
  local data = cjson.encode({requeued = true, attempt = attempts})
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', 'queued', 'data', data)
  return -2
end
if stored == tonumber(ARGV[7]) then
  if ARGV[3] ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', 'delta', 'data', ARGV[3])
  end
  if ARGV[4] ~= '' and redis.call('APPEND', KEYS[3], ARGV[4]) == #ARGV[4] then
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[3], ttl) end
  end
  redis.call('HSET', KEYS[1], 'prompt_tokens', ARGV[5], 'completion_tokens', ARGV[6])
  for first = 9, #ARGV, 4000 do  -- in parts: Lua unpacks at most about 8,000 values at once
    redis.call('RPUSH', KEYS[4], unpack(ARGV, first, math.min(first + 3999, #ARGV)))
  end
  if #ARGV >= 9 and tonumber(ARGV[7]) == 0 then
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) end
  end
end
if job[3] then return 1 end
return 0
"""

# Renews a run's lease. KEYS: job hash, lease. ARGV: run id, lease ms. Returns 1, 0 when the
# run no longer holds the job (it was handed to another worker), or -1 when the job's record is
# gone (it expired, or Redis lost its data): in both cases the run must stop.
_RENEW = """
local run = redis.call('HGET', KEYS[1], 'run')
if run == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
  return 1
end
if not run and redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
return 0
"""

# The start of every script that ends a job (KEYS[1..3]: job hash, events, text): it answers
# "missing" or the final status already there, else defines finish() for the rest to call.
_ENDING_LUA = """
local job = redis.call('HMGET', KEYS[1], 'status', 'run', 'cancel')
local status = job[1]
if not status then return 'missing' end
if status == 'finished' or status == 'failed' or status == 'canceled' then return status end
local function finish(status, event, data, ttl, maxlen, first_field)
  redis.call('HSET', KEYS[1], 'status', status, unpack(ARGV, first_field))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', maxlen, '*', 'event', event, 'data', data)
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

# Writes a job's final state once, from the run that holds it (or from no run: run id "").
# KEYS: job hash, events, text, tokens, lease, running set.
# ARGV: status, event name, event data, ttl, maxlen, run id, job id, then field/value pairs.
# Returns "ok", "lost" (another run holds the job), "missing", or the final status already there.
_FINISH = (
    _ENDING_LUA
    + """
if ARGV[6] ~= '' and job[2] ~= ARGV[6] then return 'lost' end
finish(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 8)
redis.call('DEL', KEYS[4], KEYS[5])
redis.call('ZREM', KEYS[6], ARGV[7])
return 'ok'
"""
)

# Hands a running job back to its queue: its worker died (no lease; run id "") or is stopping
# (its own run id). KEYS: job hash, events, text, tokens, lease, running set, and for a handback
# the model's RQ queue list: the job id goes back on its front in the same step, so a worker
# killed before RQ's own re-enqueue cannot leave the job queued with nothing to run it (the
# janitor enqueues in RQ itself, before this script).
# ARGV: job id, maxlen, ttl, attempts allowed, event data for a failure, then the failure's
# field/value pairs... and, last, the run id.
# Returns "requeued", "alive" (the lease is live), "lost", "failed" (attempts used up),
# "canceled" (a cancel was pending), "missing", or the final status already there.
_REQUEUE = (
    _ENDING_LUA
    + """
local run = ARGV[#ARGV]
if status ~= 'running' then redis.call('ZREM', KEYS[6], ARGV[1]) return status end
if run ~= '' then
  if job[2] ~= run then return 'lost' end
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)  -- a handback is not a lost attempt
elseif redis.call('EXISTS', KEYS[5]) == 1 then return 'alive' end
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('DEL', KEYS[5])
if job[3] then
  redis.call('HSET', KEYS[1], 'status', 'canceled', 'finish_reason', 'canceled')
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', 'canceled', 'data', '{}')
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
  return 'canceled'
end
local attempts = tonumber(redis.call('HGET', KEYS[1], 'attempts') or '0')
if run == '' and attempts >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', unpack(ARGV, 6, #ARGV - 1))
  redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', 'error', 'data', ARGV[5])
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ARGV[3]) end
  return 'failed'
end
redis.call('HSET', KEYS[1], 'status', 'queued')
redis.call('HDEL', KEYS[1], 'run')
if run ~= '' and KEYS[7] then redis.call('LPUSH', KEYS[7], ARGV[1]) end
local data = cjson.encode({requeued = true, attempt = attempts})
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', 'queued', 'data', data)
return 'requeued'
"""
)

# Cancels a job. KEYS: job hash, events, text, the model's RQ queue list, its intermediate list.
# ARGV: job id, event data, ttl, maxlen, then field/value pairs to set.
# A job that no run holds (status queued: in its queue, taken by a worker that has not started
# it, or stranded by one that died) is taken off both lists and ends canceled here ("ok"): START
# is the only way from queued to running, and it finds the job final and leaves it. A running
# job gets its cancel flag for the worker running it ("running"). Returns "missing" or the final
# status if the job had already ended.
_CANCEL = (
    _ENDING_LUA
    + """
redis.call('HSET', KEYS[1], 'cancel', '1')
if status == 'running' then return 'running' end
redis.call('LREM', KEYS[4], 1, ARGV[1])
redis.call('LREM', KEYS[5], 1, ARGV[1])
finish('canceled', 'canceled', ARGV[2], ARGV[3], ARGV[4], 5)
return 'ok'
"""
)


START = Lua("start", _START)
DELTA = Lua("delta", _DELTA)
RENEW = Lua("renew", _RENEW)
FINISH = Lua("finish", _FINISH)
REQUEUE = Lua("requeue", _REQUEUE)
CANCEL = Lua("cancel", _CANCEL)

# Creates a job: the front's whole submit, in one step. KEYS: job hash, events, RQ job hash, the
# model's RQ queue list, RQ's set of queues, and (when the caller's key has a concurrency
# quota) the key's active set. ARGV: job id, most jobs queued (0: no limit), seconds the job's
# records live, maxlen, queued event data, the quota's limit, now, seconds the active set
# lives, how many items the job hash's field/value pairs take (n), then those n items and RQ's
# job's field/value pairs. Returns {"queued", the job's place in its queue (0: next)},
# {"full", jobs queued} or {"quota", 0}. A call sent again (a connection that dropped before
# the reply) finds the job created and answers "queued" again, writing nothing twice.
_SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then  -- sent again (its reply was lost): created already
  return {'queued', redis.call('LPOS', KEYS[4], ARGV[1]) or 0}
end
local limit = tonumber(ARGV[2])
if limit > 0 then
  local queued = redis.call('LLEN', KEYS[4])
  if queued >= limit then return {'full', queued} end
end
if KEYS[6] then
  if redis.call('ZCARD', KEYS[6]) >= tonumber(ARGV[6]) then return {'quota', 0} end
  redis.call('ZADD', KEYS[6], ARGV[7], ARGV[1])
  redis.call('EXPIRE', KEYS[6], ARGV[8])
end
local n = tonumber(ARGV[9])
redis.call('HSET', KEYS[1], unpack(ARGV, 10, 9 + n))
redis.call('EXPIRE', KEYS[1], ARGV[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'event', 'queued', 'data', ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[3])
redis.call('HSET', KEYS[3], unpack(ARGV, 10 + n))
redis.call('SADD', KEYS[5], KEYS[4])
return {'queued', redis.call('RPUSH', KEYS[4], ARGV[1]) - 1}
"""
SUBMIT = Lua("submit", _SUBMIT)

# Moves up to ARGV[1] ids from the head of a model's RQ queue (KEYS[1]) to the tail of its
# intermediate list (KEYS[2]), one LMOVE each as RQ's dequeue does, stopping at an empty queue:
# a worker with free slots takes what fits in one round trip. Returns the ids moved.
_TAKE = """
local taken = {}
for i = 1, tonumber(ARGV[1]) do
  local id = redis.call('LMOVE', KEYS[1], KEYS[2], 'LEFT', 'RIGHT')
  if not id then break end
  taken[i] = id
end
return taken
"""
TAKE = Lua("take", _TAKE)

SCRIPTS: tuple[Lua, ...] = (SUBMIT, START, DELTA, RENEW, FINISH, REQUEUE, CANCEL, TAKE)


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

    def execute(self, pipe: Any) -> list[Any]:
        """``pipe.execute()``; ScriptsReloaded (after loading them) when a script was missing."""
        try:
            return list(pipe.execute())
        except NoScriptError:
            for script in SCRIPTS:
                self._connection.script_load(script.source)
            raise ScriptsReloaded("Redis had lost streamq's scripts; loaded again") from None

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
    job_keys = [keys.job(job_id), keys.events(job_id), keys.lease(job_id), keys.RUNNING]
    return ScriptCall(
        START,
        job_keys + ([taken_into] if taken_into else []),
        [worker, now, maxlen, data, run, lease_ms, job_id],
    )


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
    event = Delta(text=text)
    if logprobs:
        event.logprobs = list(logprobs)
    if prompt_logprobs is not None:
        event.prompt_logprobs = list(prompt_logprobs)
    data = event.encode() if text or logprobs or prompt_logprobs is not None else ""
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


def ended_failed(error_type: str, message: str, finished_at: float | None = None) -> Ending:
    fields: dict[str, Any] = {
        JobField.FINISH_REASON: FinishReason.ERROR,
        JobField.FINISHED_AT: finished_at if finished_at is not None else time.time(),
        JobField.ERROR_TYPE: error_type,
        JobField.ERROR_MESSAGE: message,
    }
    return Ending(JobStatus.FAILED, EventName.ERROR, Failed(type=error_type, message=message), fields)


def ended_canceled(completion_tokens: int, finished_at: float | None = None) -> Ending:
    fields: dict[str, Any] = {
        JobField.FINISH_REASON: FinishReason.CANCELED,
        JobField.FINISHED_AT: finished_at if finished_at is not None else time.time(),
    }
    data = Canceled(completion_tokens=completion_tokens)
    return Ending(JobStatus.CANCELED, EventName.CANCELED, data, fields)


def finish(job_id: str, ending: Ending, *, ttl: int, maxlen: int, run: str = "") -> ScriptCall:
    """End the job once, from ``run`` (or from no run: ``run`` ""), and let its records live ``ttl``."""
    args = [
        ending.status,
        ending.event,
        ending.data.encode(),
        ttl,
        maxlen,
        run,
        job_id,
        *_pairs(ending.fields),
    ]
    return ScriptCall(FINISH, _ending_keys(job_id), args)


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
    """Hand the job back to its queue: from a stopping ``run`` (pushed onto ``queue_list`` in the
    same step), or from the janitor (no run) after its lease lapsed, failing it with ``failure``
    once ``attempts_allowed`` runs were lost."""
    failure = failure or Failed(type="", message="")
    ending = ended_failed(failure.type, failure.message)
    args = [job_id, maxlen, ttl, attempts_allowed, failure.encode(), *_pairs(ending.fields), run]
    return ScriptCall(REQUEUE, _ending_keys(job_id) + ([queue_list] if queue_list else []), args)


def cancel(job_id: str, model: str, *, ttl: int, maxlen: int, finished_at: float | None = None) -> ScriptCall:
    """Cancel the job: ended here if no run holds it, else flagged for its run."""
    queue = keys.rq_queue(model)
    ending = ended_canceled(0, finished_at)
    return ScriptCall(
        CANCEL,
        [keys.job(job_id), keys.events(job_id), keys.text(job_id), queue, keys.intermediate(queue)],
        [job_id, ending.data.encode(), ttl, maxlen, *_pairs(ending.fields)],
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
