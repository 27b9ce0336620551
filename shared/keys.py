"""Every Redis key and channel name streamq uses, in one place.

A job's own keys share the hash tag ``{<job id>}`` so they land on one slot of a Redis
Cluster and a Lua script may touch them together.
"""

from __future__ import annotations

from rq.defaults import RQ_KEY_PREFIX

PREFIX = "streamq"

# Pub/sub channel on which cancel requests are announced to workers (the job hash's
# `cancel` field is the durable copy of the same request).
CANCEL_CHANNEL = f"{PREFIX}:cancel"
# Sorted set of live workers: member = worker name, score = last heartbeat (unix seconds).
WORKERS = f"{PREFIX}:workers"
# RQ's own set of the queues it has seen (members: their list keys, as rq_queue() names them).
RQ_QUEUES = f"{RQ_KEY_PREFIX}:queues"


def job(job_id: str) -> str:
    """Hash with the job's request, state, timings and usage."""
    return f"{PREFIX}:job:{{{job_id}}}"


def events(job_id: str) -> str:
    """Stream of the job's events (queued, started, delta, done | error | canceled)."""
    return f"{PREFIX}:events:{{{job_id}}}"


def text(job_id: str) -> str:
    """String holding the answer generated so far (appended to as deltas are published)."""
    return f"{PREFIX}:text:{{{job_id}}}"


def response(job_id: str) -> str:
    """Hash of a Responses API response's record (``owner``, ``record``: its input, instructions,
    settings and conversation, as JSON) beside the job that answers it; it outlives the job's
    own records (``Settings.response_record_life``) and is not served once its job is gone."""
    return f"{PREFIX}:response:{{{job_id}}}"


def worker(name: str) -> str:
    """Hash describing one worker process (model, device, pid, host, current job)."""
    return f"{PREFIX}:worker:{name}"


def hub_wakeup(front_id: str) -> str:
    """Stream a front process writes to when its multiplexed reader must pick up new streams."""
    return f"{PREFIX}:hub:{front_id}"


def queue_name(model: str) -> str:
    """The RQ queue name for a served model (one queue per model)."""
    return f"{PREFIX}:{model}"


def rq_queue(model: str) -> str:
    """The Redis list behind the model's RQ queue (what autoscalers watch)."""
    return f"{RQ_KEY_PREFIX}:queue:{queue_name(model)}"


def rq_queue_name(queue_list: str) -> str:
    """The RQ queue name of the list ``queue_list`` (``rq:queue:NAME``): RQ's ``Queue(NAME)``."""
    return queue_list.removeprefix(f"{RQ_KEY_PREFIX}:queue:")


def rq_job(job_id: str) -> str:
    """RQ's hash of the job (its function call, status, registries' times), as RQ names it."""
    return f"{RQ_KEY_PREFIX}:job:{job_id}"


def intermediate(queue_list: str) -> str:
    """RQ's list of jobs a worker took off ``queue_list`` and has not yet started (BLMOVE)."""
    return f"{queue_list}:intermediate"


def count_requests(model: str) -> str:
    """List of prompt-length questions from fronts, answered by the model's workers."""
    return f"{PREFIX}:count:{model}"


def count_reply(request_id: str) -> str:
    """List a front waits on (BLPOP) for the answer to one prompt-length question."""
    return f"{PREFIX}:count-reply:{request_id}"


# A random secret, made by the first front that needs it: a job made with an Idempotency-Key has
# the id HMAC(secret, key name, key), which no one can work out from the key alone.
IDEMPOTENCY_SECRET = f"{PREFIX}:idempotency-secret"


def tokens(job_id: str) -> str:
    """List of the answer's token ids so far, kept so that another worker can continue the job."""
    return f"{PREFIX}:tokens:{{{job_id}}}"


def lease(job_id: str) -> str:
    """String (the run id) that exists while a worker holds the running job; it expires unless renewed."""
    return f"{PREFIX}:lease:{{{job_id}}}"


# Sorted set of running jobs (member = job id, score = start time), checked by the janitor.
RUNNING = f"{PREFIX}:running"
# Lock that makes one janitor at a time look for jobs whose worker died.
JANITOR_LOCK = f"{PREFIX}:janitor"
# A random id written once into a Redis that holds streamq's data (no TTL): a process that finds
# it gone or changed knows Redis lost its data (see shared/redis_epoch.py).
EPOCH = f"{PREFIX}:epoch"


def drained(model: str) -> str:
    """Sorted set of the model's recently ended jobs (finished, failed or canceled), one entry per
    end (score = unix time of the end; the member names no job). Workers add to it and trim it
    to the last couple of minutes; fronts read the model's drain rate off it."""
    return f"{PREFIX}:drained:{model}"


def key_active(name: str) -> str:
    """Sorted set of the jobs an API key (by name) has queued or running (member = job id, score =
    when it was admitted): its concurrency quota. Ended jobs are pruned at the key's next submit."""
    return f"{PREFIX}:key-active:{name}"


# Prefix of the per-key request-rate counters (kept by the `limits` library's Redis storage).
RATE_LIMIT_PREFIX = f"{PREFIX}:rate"
