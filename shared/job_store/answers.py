"""What the job store's scripts answer (``scripts.py`` builds their calls), beside a job's final
status (``JobStatus``): the words and numbers a caller tells its next step by."""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any


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
    EXISTS = "exists"  # submit: the id has a job already (sent again), with its fingerprint


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
