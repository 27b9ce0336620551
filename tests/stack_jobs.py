"""Jobs on the end-to-end stack (tests/conftest.py's ``Stack``): submitting one, what Redis holds of
jobs and responses, the workers that run them."""

from __future__ import annotations

from typing import Any

import httpx

from harness.services import Service, wait_for
from shared import keys
from shared.schemas import GenerationRequest
from tests.conftest import Stack
from tests.redis_replies import decoded


def submit(client: httpx.Client, url: str, **body: Any) -> dict[str, Any]:
    response = client.post(f"{url}/v1/jobs", json=body)
    assert response.status_code == 202, response.text
    assert response.headers["Location"] == f"/v1/jobs/{response.json()['id']}"
    return dict(response.json())


def job_records(stack: Stack) -> set[str]:
    """Every job record in Redis: streamq's job hashes and event streams, RQ's job hashes, and the
    ids in RQ's queue lists. A refused request must add none; other keys (leases, locks, ended
    jobs' records) may come and go meanwhile, so a count of keys cannot tell."""
    client = stack.redis.client(decode_responses=True)
    records: set[str] = set()
    for pattern in (keys.job("*"), keys.events("*"), keys.rq_job("*")):
        records.update(client.scan_iter(match=pattern))
    for queue in client.scan_iter(match=keys.rq_queue("*")):
        if client.type(queue) == "list":
            records.update(f"{queue} {decoded(job_id)}" for job_id in client.lrange(queue, 0, -1))
    return records


def model_of(stack: Stack) -> str:
    return stack.model_dir.name


def job_of(response_id: str) -> str:
    return response_id.removeprefix("resp_")


def asked(stack: Stack, response_id: str) -> GenerationRequest:
    """The request the response's job was given, as its worker reads it."""
    stored = stack.redis.client(decode_responses=True).hget(keys.job(job_of(response_id)), "request")
    assert isinstance(stored, str)
    return GenerationRequest.model_validate_json(stored)


def engines_offer(stack: Stack, *features: str) -> bool:
    """Whether every live worker of the stack's model announces ``features`` (the transformers
    engine's guided decoding and tools are on their way; until then the front refuses them)."""
    r = stack.redis.client(decode_responses=True)
    workers = [r.hgetall(keys.worker(decoded(name))) for name in r.zrange(keys.WORKERS, 0, -1)]
    mine = [w for w in workers if w.get("model") == model_of(stack)]
    return bool(mine) and all(set(features) <= set(decoded(w.get("features", "")).split(",")) for w in mine)


def start_workers(stack: Stack, model: str, *extra: str, env: dict[str, str] | None = None) -> list[Service]:
    services = []
    for name in (f"{model}-a", f"{model}-b"):
        args = ["worker", "--model", str(stack.model_dir), "--served-name", model, "--name", name, *extra]
        # A shorter lease than the default 5 s keeps the test's 10 s bound clear of a busy CI box.
        worker_env = {**stack.env, "STREAMQ_LEASE_SECONDS": "2", **(env or {})}
        service = Service(args, worker_env, name, stack.logdir)
        stack.services.append(service)
        services.append(service)

    def both_live() -> bool:
        return httpx.get(f"{stack.url}/readyz").json()["models"].get(model, 0) == 2

    wait_for(both_live, 90, f"two workers serving {model}")
    return services


def running_on(stack: Stack, job_id: str, min_tokens: int) -> str:
    """The worker process running the job once it has produced ``min_tokens``."""
    seen: dict[str, Any] = {}

    def far_enough() -> bool:
        seen.update(httpx.get(f"{stack.url}/v1/jobs/{job_id}").json())
        return seen["status"] == "running" and seen["usage"]["completion_tokens"] >= min_tokens

    wait_for(far_enough, 60, "the job to be well under way")
    return str(seen["worker"])
