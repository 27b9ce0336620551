"""A job's state in Redis: the fields of its hash, its events, and the Lua scripts that move it.

Both the front and the workers change a job's state through the scripts here, so each
transition is atomic and a job's final state (finished | failed | canceled) is written once:
a late writer finds it already final and leaves it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

from shared import keys
from shared.schemas import JobError, JobView, Usage

# Names of the events in a job's stream.
EVENT_QUEUED = "queued"
EVENT_STARTED = "started"
EVENT_DELTA = "delta"
EVENT_DONE = "done"
EVENT_ERROR = "error"
EVENT_CANCELED = "canceled"
FINAL_EVENTS: frozenset[str] = frozenset({EVENT_DONE, EVENT_ERROR, EVENT_CANCELED})

# Moves a queued job to running under a new run id, and gives that run the job's lease.
# KEYS: job hash, events, lease, running set. ARGV: worker, now, maxlen, event data, run id,
# lease ms, job id. Returns "running", "cancel" (a cancel was asked before it started),
# "taken" (another run holds a live lease), "missing", or the job's final status.
START_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return status end
if redis.call('HGET', KEYS[1], 'cancel') then return 'cancel' end
if status == 'running' and redis.call('EXISTS', KEYS[3]) == 1 then return 'taken' end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'run', ARGV[5])
redis.call('HSETNX', KEYS[1], 'started_at', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'attempts', 1)
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
redis.call('ZADD', KEYS[4], ARGV[2], ARGV[7])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', 'started', 'data', ARGV[4])
return 'running'
"""

# A running job's new output, written only by the run that holds it, and only once: ARGV[7] is
# how many token ids the job had stored before this write, so a round trip that is sent again
# (its reply was lost) finds them already there and writes nothing twice.
# KEYS: job hash, events, text, tokens. ARGV: run id, maxlen, delta event data (or ""), text
# (or ""), prompt tokens, completion tokens, token ids stored before, then the new token ids.
# Returns 0, 1 (a cancel was asked), or -1 (this run no longer holds the job: stop, write nothing).
DELTA_SCRIPT = """
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then return -1 end
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return -1 end
if redis.call('LLEN', KEYS[4]) == tonumber(ARGV[7]) then
  if ARGV[4] ~= '' then
    redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'event', 'delta', 'data', ARGV[3])
    redis.call('APPEND', KEYS[3], ARGV[4])
  end
  redis.call('HSET', KEYS[1], 'prompt_tokens', ARGV[5], 'completion_tokens', ARGV[6])
  if #ARGV >= 8 then
    redis.call('RPUSH', KEYS[4], unpack(ARGV, 8))
    local ttl = redis.call('PTTL', KEYS[1])
    if ttl > 0 then redis.call('PEXPIRE', KEYS[4], ttl) end
  end
end
if redis.call('HGET', KEYS[1], 'cancel') then return 1 end
return 0
"""

# Renews a run's lease. KEYS: job hash, lease. ARGV: run id, lease ms. Returns 1, 0 when the
# run no longer holds the job (it was handed to another worker), or -1 when the job's record is
# gone (it expired, or Redis lost its data): in both cases the run must stop.
RENEW_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'run') ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

# The start of every script that ends a job (KEYS[1..3]: job hash, events, text): it answers
# "missing" or the final status already there, else defines finish() for the rest to call.
_ENDING_LUA = """
local status = redis.call('HGET', KEYS[1], 'status')
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
FINISH_SCRIPT = (
    _ENDING_LUA
    + """
if ARGV[6] ~= '' and redis.call('HGET', KEYS[1], 'run') ~= ARGV[6] then return 'lost' end
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
REQUEUE_SCRIPT = (
    _ENDING_LUA
    + """
local run = ARGV[#ARGV]
if status ~= 'running' then redis.call('ZREM', KEYS[6], ARGV[1]) return status end
if run ~= '' then
  if redis.call('HGET', KEYS[1], 'run') ~= run then return 'lost' end
  redis.call('HINCRBY', KEYS[1], 'attempts', -1)  -- a handback is not a lost attempt
elseif redis.call('EXISTS', KEYS[5]) == 1 then return 'alive' end
redis.call('ZREM', KEYS[6], ARGV[1])
redis.call('DEL', KEYS[5])
if redis.call('HGET', KEYS[1], 'cancel') then
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
CANCEL_SCRIPT = (
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


def cancel_keys(job_id: str, model: str) -> list[str]:
    """KEYS for CANCEL_SCRIPT."""
    queue = keys.rq_queue(model)
    return [keys.job(job_id), keys.events(job_id), keys.text(job_id), queue, keys.intermediate(queue)]


# Characters some line readers take for line breaks (str.splitlines, httpx's iter_lines, old JS
# engines); SSE does not, but a client that does would cut the event. JSON may escape them.
_LINE_SEPARATORS = {"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"}
_SEPARATOR = re.compile("[\u2028\u2029\x85]")


def encode(data: Mapping[str, Any] | None) -> str:
    """JSON for an event's ``data`` field: UTF-8 as is, but U+2028, U+2029 and U+0085 escaped."""
    text = json.dumps(data or {}, separators=(",", ":"), ensure_ascii=False)
    return _SEPARATOR.sub(lambda m: _LINE_SEPARATORS[m.group()], text)


def _pairs(fields: Mapping[str, Any]) -> list[Any]:
    return [item for name, value in fields.items() if value is not None for item in (name, value)]


def finish_args(
    status: str,
    event: str,
    data: Mapping[str, Any],
    ttl: int,
    maxlen: int,
    fields: Mapping[str, Any],
    run: str = "",
    job_id: str = "",
) -> list[Any]:
    """ARGV for FINISH_SCRIPT."""
    return [status, event, encode(data), ttl, maxlen, run, job_id, *_pairs(fields)]


def ending_keys(job_id: str) -> list[str]:
    """KEYS for FINISH_SCRIPT and REQUEUE_SCRIPT."""
    return [
        keys.job(job_id),
        keys.events(job_id),
        keys.text(job_id),
        keys.tokens(job_id),
        keys.lease(job_id),
        keys.RUNNING,
    ]


def requeue_args(
    job_id: str, maxlen: int, ttl: int, attempts: int, failure: Mapping[str, Any], run: str = ""
) -> list[Any]:
    """ARGV for REQUEUE_SCRIPT; ``failure`` is {type, message} for a job out of attempts."""
    fields = {
        "finish_reason": "error",
        "finished_at": time.time(),
        "error_type": failure["type"],
        "error_message": failure["message"],
    }
    return [job_id, maxlen, ttl, attempts, encode(failure), *_pairs(fields), run]


def cancel_args(job_id: str, ttl: int, maxlen: int, fields: Mapping[str, Any]) -> list[Any]:
    """ARGV for CANCEL_SCRIPT."""
    return [job_id, encode({"completion_tokens": 0}), ttl, maxlen, *_pairs(fields)]


def _float(value: str | None) -> float | None:
    return float(value) if value not in (None, "") else None


def view_from_hash(job_id: str, fields: Mapping[str, str], text: str, position: int | None) -> JobView:
    """Build the public job view from the job's hash and text (both decoded to str)."""
    error = None
    if fields.get("error_type"):
        error = JobError(type=fields["error_type"], message=fields.get("error_message", ""))
    status = fields["status"]
    return JobView(
        id=job_id,
        model=fields.get("model", ""),
        status=status,
        position=position if status == "queued" else None,
        text=text,
        finish_reason=fields.get("finish_reason") or None,
        usage=Usage(
            prompt_tokens=int(fields.get("prompt_tokens") or 0),
            completion_tokens=int(fields.get("completion_tokens") or 0),
        ),
        created_at=float(fields.get("created_at") or 0.0),
        started_at=_float(fields.get("started_at")),
        finished_at=_float(fields.get("finished_at")),
        worker=fields.get("worker") or None,
        error=error,
    )
