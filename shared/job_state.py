"""A job's state in Redis: the fields of its hash, its events, and the Lua scripts that move it.

Both the front and the workers change a job's state through the scripts here, so each
transition is atomic and a job's final state (finished | failed | canceled) is written once:
a late writer finds it already final and leaves it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from shared.schemas import JobError, JobView, Usage

# Names of the events in a job's stream.
EVENT_QUEUED = "queued"
EVENT_STARTED = "started"
EVENT_DELTA = "delta"
EVENT_DONE = "done"
EVENT_ERROR = "error"
EVENT_CANCELED = "canceled"
FINAL_EVENTS: frozenset[str] = frozenset({EVENT_DONE, EVENT_ERROR, EVENT_CANCELED})

# Moves a queued job to running. KEYS: job hash, events. ARGV: worker, now, maxlen, event data.
# Returns "running", "cancel" (a cancel was asked before it started), "missing", or the
# job's current final status.
START_SCRIPT = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return 'missing' end
if status ~= 'queued' and status ~= 'running' then return status end
if redis.call('HGET', KEYS[1], 'cancel') then return 'cancel' end
redis.call('HSET', KEYS[1], 'status', 'running', 'worker', ARGV[1], 'started_at', ARGV[2])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'event', 'started', 'data', ARGV[4])
return 'running'
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

# Writes a job's final state once. KEYS: job hash, events, text.
# ARGV: status, event name, event data, ttl, maxlen, then field/value pairs to set.
# Returns "ok", "missing", or the final status that was already there.
FINISH_SCRIPT = (
    _ENDING_LUA
    + """
finish(ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], 6)
return 'ok'
"""
)

# Cancels a job. KEYS: job hash, events, text, the model's RQ queue list.
# ARGV: job id, event data, ttl, maxlen, then field/value pairs to set.
# A job still in its queue is taken off it and ends canceled here ("ok"); otherwise its cancel
# flag is set for the worker running it ("running"). Returns "missing" or the final status if
# the job had already ended.
CANCEL_SCRIPT = (
    _ENDING_LUA
    + """
redis.call('HSET', KEYS[1], 'cancel', '1')
if redis.call('LREM', KEYS[4], 1, ARGV[1]) == 0 then return 'running' end
finish('canceled', 'canceled', ARGV[2], ARGV[3], ARGV[4], 5)
return 'ok'
"""
)


def encode(data: Mapping[str, Any] | None) -> str:
    """JSON for an event's ``data`` field."""
    return json.dumps(data or {}, separators=(",", ":"), ensure_ascii=False)


def _pairs(fields: Mapping[str, Any]) -> list[Any]:
    return [item for name, value in fields.items() if value is not None for item in (name, value)]


def finish_args(
    status: str, event: str, data: Mapping[str, Any], ttl: int, maxlen: int, fields: Mapping[str, Any]
) -> list[Any]:
    """ARGV for FINISH_SCRIPT."""
    return [status, event, encode(data), ttl, maxlen, *_pairs(fields)]


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
