"""The words of the job protocol: statuses, event names, finish reasons and the job hash's fields.

They are ``StrEnum`` members, so each one is also the exact string stored in Redis and sent to
clients; the Lua scripts (``scripts.py``) use the same strings, and a test checks that every
field a script touches is one of ``JobField``.
"""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    CANCELED = "canceled"


FINAL_STATUSES: frozenset[str] = frozenset({JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED})


class EventName(StrEnum):
    """The events of a job's stream, in the order a job may write them."""

    QUEUED = "queued"  # on submit, and again when a job is handed back to its queue
    STARTED = "started"
    DELTA = "delta"
    DONE = "done"
    ERROR = "error"
    CANCELED = "canceled"


FINAL_EVENTS: frozenset[str] = frozenset({EventName.DONE, EventName.ERROR, EventName.CANCELED})


class FinishReason(StrEnum):
    STOP = "stop"
    LENGTH = "length"
    TIMEOUT = "timeout"
    CANCELED = "canceled"
    ERROR = "error"


class JobField(StrEnum):
    """The fields of a job's hash (``keys.job``)."""

    ID = "id"
    MODEL = "model"
    OWNER = "owner"  # the API key's name (OPEN without keys): another key's job is not found
    REQUEST = "request"  # the GenerationRequest, as JSON
    FINGERPRINT = "fingerprint"  # with an Idempotency-Key: what was asked (api.idempotency)
    WITHDRAWN = "withdrawn"  # "1": refused after it was written (no replica had it in time)
    STATUS = "status"
    CREATED_AT = "created_at"
    STARTED_AT = "started_at"  # set by the first start only
    FINISHED_AT = "finished_at"
    WORKER = "worker"  # the worker process running it (its last one, once ended)
    RUN = "run"  # the run id holding the job's lease while it runs
    ATTEMPTS = "attempts"  # runs started, minus handbacks
    CANCEL = "cancel"  # "1" once a cancel was asked
    PROMPT_TOKENS = "prompt_tokens"
    COMPLETION_TOKENS = "completion_tokens"
    STORED_TOKENS = "stored_tokens"  # token ids in the job's list, kept in the same step as the list
    FINISH_REASON = "finish_reason"
    ERROR_TYPE = "error_type"
    ERROR_MESSAGE = "error_message"
    ERROR_PARAM = "error_param"  # the request field an invalid_request_error is about, if any
    ERROR_CODE = "error_code"  # OpenAI's code for the error, if it has one
