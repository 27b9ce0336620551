"""What Redis says about the deployment right now: queues, workers, jobs by state.

Read at the moment of asking (a Prometheus scrape of the front, ``streamq status``), with a
synchronous client, in a few pipelined round trips; nothing is cached and nothing is written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC
from typing import Any, cast

import redis
from rq.job import Job
from rq.registry import CanceledJobRegistry, FailedJobRegistry, FinishedJobRegistry
from rq.utils import utcparse

from shared import keys

# RQ's registries of ended jobs, by the status streamq gives those jobs. Entries stay until
# their score (the entry's expiry time, unix seconds) has passed: about STREAMQ_RESULT_TTL.
ENDED_REGISTRIES = {
    "finished": FinishedJobRegistry,
    "failed": FailedJobRegistry,
    "canceled": CanceledJobRegistry,
}


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True)
class QueueStat:
    model: str
    depth: int  # jobs waiting in the model's RQ queue
    oldest_wait: float | None  # seconds the job at its head has waited (None: empty)


@dataclass(frozen=True)
class WorkerStat:
    name: str
    model: str
    device: str
    slots: int
    busy: int  # jobs it runs now
    last_heartbeat: float  # unix seconds
    host: str
    metrics_port: str  # "" when it serves no /metrics
    live: bool  # heard from within STREAMQ_WORKER_TTL
    draining: bool = False  # stopping: its slots take no new job (counted as its busy ones)


def model_of_queue_key(key: str) -> str | None:
    """The served model behind one of RQ's queue list keys (None: not a streamq queue)."""
    prefix = keys.rq_queue("")
    return key[len(prefix) :] if key.startswith(prefix) and len(key) > len(prefix) else None


def known_models(connection: redis.Redis, workers: list[WorkerStat] | None = None) -> list[str]:
    """Models with a queue RQ has seen, or with a worker."""
    members = cast(set[Any], connection.smembers(keys.RQ_QUEUES))
    models = {model_of_queue_key(_text(k)) for k in members}
    models |= {w.model for w in workers or [] if w.model}
    return sorted(m for m in models if m)


def queues(connection: redis.Redis, models: list[str], now: float | None = None) -> list[QueueStat]:
    """Depth of each model's queue and how long its oldest job has waited."""
    now = time.time() if now is None else now
    pipe = connection.pipeline(transaction=False)
    for model in models:
        pipe.llen(keys.rq_queue(model))
        pipe.lindex(keys.rq_queue(model), 0)  # RQ pops from the left: the head is the oldest
    replies = pipe.execute()
    heads = [_text(h) if h is not None else None for h in replies[1::2]]
    pipe = connection.pipeline(transaction=False)
    for head in heads:
        if head is not None:
            # Since it was last put in the queue: a job handed back or requeued after its
            # worker died waits again from then (RQ's enqueued_at), not from its creation.
            pipe.hget(Job.key_for(head), "enqueued_at")
            pipe.hget(keys.job(head), "created_at")
    found = iter(pipe.execute() if any(h is not None for h in heads) else [])
    stats = []
    for model, depth, head in zip(models, replies[0::2], heads, strict=True):
        enqueued, created = (next(found), next(found)) if head is not None else (None, None)
        at = utcparse(_text(enqueued)).replace(tzinfo=UTC).timestamp() if enqueued else created
        wait = max(0.0, now - float(_text(at))) if at is not None else None
        stats.append(QueueStat(model, int(depth), wait if int(depth) else None))
    return stats


def workers(connection: redis.Redis, worker_ttl: float, now: float | None = None) -> list[WorkerStat]:
    """Every worker process in streamq's list (a silent one is kept, marked not live, until the
    janitor removes it)."""
    now = time.time() if now is None else now
    entries = cast(list[tuple[Any, float]], connection.zrange(keys.WORKERS, 0, -1, withscores=True))
    listed = [(_text(n), float(s)) for n, s in entries]
    pipe = connection.pipeline(transaction=False)
    for name, _score in listed:
        pipe.hgetall(keys.worker(name))
    stats = []
    for (name, score), raw in zip(listed, pipe.execute() if listed else [], strict=True):
        info = {_text(k): _text(v) for k, v in raw.items()}
        if not info:
            continue
        current = [j for j in info.get("current_job", "").split(",") if j]
        stats.append(
            WorkerStat(
                name=name,
                model=info.get("model", ""),
                device=info.get("device", ""),
                # A draining worker's capacity is what it still runs: its free slots take nothing.
                slots=len(current) if info.get("draining") else int(info.get("slots") or 0),
                busy=len(current),
                draining=bool(info.get("draining")),
                last_heartbeat=float(info.get("last_heartbeat") or score),
                host=info.get("host", ""),
                metrics_port=info.get("metrics_port", ""),
                live=score >= now - worker_ttl,
            )
        )
    return stats


def ended_counts(
    connection: redis.Redis, models: list[str], now: float | None = None
) -> dict[str, dict[str, int]]:
    """Model → status → jobs that ended so (those RQ still keeps, about the result TTL)."""
    now = time.time() if now is None else now
    pipe = connection.pipeline(transaction=False)
    for model in models:
        for registry in ENDED_REGISTRIES.values():
            pipe.zcount(registry(keys.queue_name(model), connection=connection).key, now, "+inf")
    replies = iter(pipe.execute() if models else [])
    return {model: {status: int(next(replies)) for status in ENDED_REGISTRIES} for model in models}


def running_jobs(connection: redis.Redis) -> int:
    """Jobs running now on any worker (streamq's running set)."""
    return int(connection.zcard(keys.RUNNING))
