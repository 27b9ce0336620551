"""``streamq status``: the deployment at a glance, read from Redis (``rq info`` works beside it).

Three tables: queues (depth, how long the oldest job has waited), workers (model, device,
slots busy/total, last heartbeat), and jobs by state per model (queued and running now;
finished, failed and canceled as RQ still keeps them, about ``STREAMQ_RESULT_TTL``).
"""

from __future__ import annotations

import sys
import time

import redis
from rich.console import Console
from rich.table import Table

from shared import queue_stats
from shared.queue_stats import QueueStat, WorkerStat
from shared.redis_connect import RedisTarget
from shared.settings import Settings


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def queue_table(queues: list[QueueStat]) -> Table:
    table = Table(title="queues")
    table.add_column("model")
    table.add_column("depth", justify="right")
    table.add_column("oldest wait", justify="right")
    for q in queues:
        table.add_row(q.model, str(q.depth), _age(q.oldest_wait))
    return table


def worker_table(workers: list[WorkerStat], now: float) -> Table:
    table = Table(title="workers")
    for column in ("worker", "model", "device", "slots busy/total", "last heartbeat", "host", "metrics"):
        table.add_column(column, justify="right" if column == "slots busy/total" else "left")
    for w in sorted(workers, key=lambda w: (w.model, w.name)):
        beat = f"{_age(now - w.last_heartbeat)} ago" + ("" if w.live else " (silent)")
        beat += " (draining)" if w.draining and w.live else ""
        port = f":{w.metrics_port}" if w.metrics_port else "-"
        table.add_row(w.name, w.model, w.device, f"{w.busy}/{w.slots}", beat, w.host, port)
    return table


def job_table(
    queues: list[QueueStat], workers: list[WorkerStat], ended: dict[str, dict[str, int]], running: int
) -> Table:
    table = Table(title=f"jobs by state (running on all workers: {running})")
    table.add_column("model")
    for state in ("queued", "running", *queue_stats.ENDED_REGISTRIES):
        table.add_column(state, justify="right")
    for q in queues:
        busy = sum(w.busy for w in workers if w.model == q.model and w.live)
        counts = ended.get(q.model, {})
        table.add_row(
            q.model, str(q.depth), str(busy), *(str(counts.get(s, 0)) for s in queue_stats.ENDED_REGISTRIES)
        )
    return table


def print_status(settings: Settings, console: Console | None = None) -> int:
    """Print the three tables; 1 (with the reason) when Redis cannot be read."""
    # Wide enough that a pipe or a narrow terminal does not wrap worker names.
    console = console or Console(width=max(Console().width, 140))
    target = RedisTarget.of(settings)
    try:
        connection = target.client(socket_timeout=settings.redis_socket_timeout)
    except ValueError as exc:  # not a Redis URL
        print(f"streamq status: {exc}", file=sys.stderr)
        return 2
    try:
        now = time.time()
        workers = queue_stats.workers(connection, settings.worker_ttl, now)
        models = queue_stats.known_models(connection, workers)
        queues = queue_stats.queues(connection, models, now)
        ended = queue_stats.ended_counts(connection, models, now)
        running = queue_stats.running_jobs(connection)
    except redis.RedisError as exc:
        print(f"streamq status: cannot read Redis at {target.describe()}: {exc}", file=sys.stderr)
        return 1
    finally:
        connection.close()
    console.print(f"streamq status: {target.describe()}")
    console.print(queue_table(queues))
    console.print(worker_table(workers, now))
    console.print(job_table(queues, workers, ended, running))
    if not workers and not models:
        # `streamq up` runs its own private Redis: its banner says how to read that one.
        console.print(
            "No worker or queue in this Redis. For a `streamq up` stack, run the status command "
            "its banner prints (STREAMQ_REDIS_URL=... streamq status); else set STREAMQ_REDIS_URL."
        )
    return 0
