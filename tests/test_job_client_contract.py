"""The fast tier's in-memory job system (tests/fast/memory_jobs.py) keeps the job client's
contract as the real one does (RedisJobClient on a real Redis): the same cases, run against
both, get the same answers. Jobs stay queued here (no worker; the memory client holds them), so
what is compared is the front's side: views, ownership, cancels, idempotency, event ids and
Responses records."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from api.auth import Caller
from api.errors import ApiError
from api.idempotency import Idempotent, fingerprint
from api.job_client import JobClient
from api.metrics import FrontMetrics
from api.redis_job_client import RedisJobClient
from harness.redis_server import RedisServer
from shared.schemas import ChatMessage, JobRequest
from shared.settings import Settings
from tests.fast.memory_jobs import MemoryJobClient

ALICE, BOB = Caller("alice"), Caller("bob")


def _request(model: str, words: str = "hello there") -> JobRequest:
    return JobRequest(model=model, messages=[ChatMessage(role="user", content=words)], max_tokens=4)


def _contract(
    kind: str, redis_server: RedisServer, body: Callable[[JobClient, str], Awaitable[None]]
) -> None:
    model = f"contract-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_server.url, models=model, scale_to_zero=True)

    async def main() -> None:
        jobs: Any
        if kind == "redis":
            jobs = await RedisJobClient.open(settings, FrontMetrics())
        else:
            jobs = MemoryJobClient(settings, models=(model,))
            jobs.hold = True  # queued, as with no worker
        try:
            await body(jobs, model)
        finally:
            await jobs.close()

    asyncio.run(main())


async def _refused(call: Awaitable[Any]) -> ApiError:
    with pytest.raises(ApiError) as refused:
        await call
    return refused.value


KINDS = pytest.mark.parametrize("kind", ["memory", "redis"])


@KINDS
def test_a_job_is_its_owners_and_a_cancel_ends_it_once(kind: str, redis_server: RedisServer) -> None:
    async def body(jobs: JobClient, model: str) -> None:
        made = await jobs.submit(_request(model), ALICE)
        assert (made.status, made.model) == ("queued", model)
        assert (await jobs.view(made.id, ALICE.name)).status == "queued"
        for call in (
            jobs.view(made.id, BOB.name),
            jobs.cancel(made.id, BOB.name),
            jobs.view("0" * 32, "alice"),
        ):
            missing = await _refused(call)
            assert (missing.status, missing.code, missing.param) == (404, "job_not_found", "id")
        canceled = await jobs.cancel(made.id, ALICE.name)
        assert (canceled.status, canceled.finish_reason) == ("canceled", "canceled")
        assert canceled.finished_at is not None
        again = await _refused(jobs.cancel(made.id, ALICE.name))
        assert (again.status, again.code) == (409, "job_already_ended")
        assert again.body is not None and again.body["job"]["status"] == "canceled"

    _contract(kind, redis_server, body)


@KINDS
def test_an_idempotency_key_gives_its_owner_one_job(kind: str, redis_server: RedisServer) -> None:
    async def body(jobs: JobClient, model: str) -> None:
        request, key = _request(model), str(uuid.uuid4())
        sent = Idempotent(key, fingerprint(request))
        first = await jobs.submit(request, ALICE, sent)
        again = await jobs.submit(request, ALICE, sent)
        assert again.id == first.id and again.replayed and not first.replayed
        other = await jobs.submit(request, BOB, sent)  # another key name's same key: another job
        assert other.id != first.id
        changed = _request(model, "something else")
        reused = await _refused(jobs.submit(changed, ALICE, Idempotent(key, fingerprint(changed))))
        assert (reused.status, reused.code) == (400, "idempotency_key_reused")

    _contract(kind, redis_server, body)


@KINDS
def test_a_jobs_events_begin_queued_and_their_ids_are_resume_points(
    kind: str, redis_server: RedisServer
) -> None:
    async def body(jobs: JobClient, model: str) -> None:
        made = await jobs.submit(_request(model), ALICE)
        events = jobs.follow(made, "0-0", None)
        first = await anext(events)
        while first is None or first.id is None:  # keep-alives and live positions carry no id
            first = await anext(events)
        await events.aclose()
        assert first.event == "queued" and first.data["model"] == model
        ms, seq = (int(part) for part in first.id.split("-"))
        assert await jobs.resume_point(made.id, (ms, seq)) == (first.id, True)
        assert await jobs.resume_point(made.id, (ms, seq + 1)) == (first.id, False)  # no such event
        assert await jobs.resume_point("0" * 32, (ms, seq)) == (None, False)

    _contract(kind, redis_server, body)


@KINDS
def test_a_responses_record_is_its_owners_until_deleted(kind: str, redis_server: RedisServer) -> None:
    async def body(jobs: JobClient, model: str) -> None:
        made = await jobs.submit(_request(model), ALICE)
        await jobs.save_response(made.id, ALICE.name, '{"id": "resp_x"}')
        assert await jobs.load_response(made.id, ALICE.name) == '{"id": "resp_x"}'
        assert await jobs.load_response(made.id, BOB.name) is None
        assert await jobs.delete_response(made.id, BOB.name) is False
        assert await jobs.delete_response(made.id, ALICE.name) is True
        assert await jobs.load_response(made.id, ALICE.name) is None
        assert await jobs.delete_response(made.id, ALICE.name) is False
        assert await jobs.load_response("0" * 32, ALICE.name) is None

    _contract(kind, redis_server, body)
