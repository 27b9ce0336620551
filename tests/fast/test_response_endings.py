"""How a response ends other than by its answer, through the official SDK over the in-memory job
system: cancelled (queued or running), deleted, its job lost with Redis's data, or its wait ended
by a stopping front."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from openai import BadRequestError, ConflictError, NotFoundError
from openai.types.responses import ResponseFailedEvent

from api.job_client import JobEvent
from api.shutdown import STOPPING
from tests.fast.conftest import Front, openai_of, settled
from tests.fast.responses_calls import CLOSE, MODEL, events_of

pytestmark = pytest.mark.anyio


async def test_cancel_a_queued_and_a_running_response(front: Front) -> None:
    client = openai_of(front)
    front.jobs.hold = True
    queued = await client.responses.create(model=MODEL, input="never runs", background=True)
    cancelled = await client.responses.cancel(queued.id)
    assert (cancelled.status, cancelled.output) == ("cancelled", [])
    assert [e.type for e in await events_of(client, queued.id)] == [
        "response.created",
        "response.queued",
        "response.cancelled",
    ]
    again = await client.responses.cancel(queued.id)  # a cancelled response is answered as it is
    assert again.status == "cancelled"

    front.jobs.hold, front.jobs.pause_after = False, 1
    running = await client.responses.create(model=MODEL, input="x y z", background=True)
    stopped = await client.responses.cancel(running.id)
    assert (stopped.status, stopped.output_text) == ("cancelled", "x")
    assert stopped.output[0].status == "incomplete"  # type: ignore[union-attr]
    events = await events_of(client, running.id)
    assert [e.type for e in events][-4:] == [*CLOSE, "response.cancelled"]

    front.jobs.release()
    done = await client.responses.create(model=MODEL, input="fine", background=True)
    await settled(lambda: front.jobs.jobs[done.id.removeprefix("resp_")].view.status == "finished")
    with pytest.raises(ConflictError) as ended:
        await client.responses.cancel(done.id)
    assert ended.value.response.headers["x-should-retry"] == "false"  # the SDK would send it again


async def test_a_foreground_response_is_neither_cancelled_nor_deleted_while_its_request_waits(
    front: Front,
) -> None:
    """As OpenAI's: only a background response is cancelled. A foreground one's request is
    waiting for it, and would take a cancelled response for its answer (the Agents SDK's
    ``Runner.run`` did, returning the text cut short as the agent's final output)."""
    client = openai_of(front)
    front.jobs.pause_after = 1
    waiting = asyncio.ensure_future(client.responses.create(model=MODEL, input="x y z"))
    await front.jobs.submitted.wait()
    [job_id] = front.jobs.jobs
    rid = f"resp_{job_id}"

    def job_id_of(response_id: str) -> str:
        return response_id.removeprefix("resp_")

    with pytest.raises(BadRequestError) as refused:
        await client.responses.cancel(rid)
    assert "background" in refused.value.message
    with pytest.raises(BadRequestError) as kept:
        await client.responses.delete(rid)
    assert "a foreground one still running" in kept.value.message
    front.jobs.release()
    answer = await waiting
    assert (answer.status, answer.output_text) == ("completed", "x y z")
    with pytest.raises(BadRequestError):  # ended or not: it was not a background response
        await client.responses.cancel(rid)
    await client.responses.delete(rid)  # once ended, it is forgotten
    with pytest.raises(NotFoundError):
        await client.responses.retrieve(rid)

    # One sent with X-Streamq-Detach runs on when its client goes: it is cancelled as a
    # background one (the Responses API is then the only way a Responses client has to stop it).
    front.jobs.pause_after = 1
    detached = asyncio.ensure_future(
        client.responses.create(model=MODEL, input="x y z", extra_headers={"X-Streamq-Detach": "1"})
    )
    await settled(lambda: len(front.jobs.jobs) == 2)
    [other] = [job_id for job_id in front.jobs.jobs if job_id != job_id_of(rid)]
    stopped = await client.responses.cancel(f"resp_{other}")
    assert stopped.status == "cancelled"
    assert (await detached).status == "cancelled"  # what its sender asked for, on its own request
    front.jobs.release()


async def test_a_job_redis_lost_ends_its_response_as_failed(front: Front) -> None:
    """The follower's final ``job_lost`` error (it has no stream entry, so no id) ends a waiting
    response as failed and a stream with its error and ``response.failed``, as on the chat route."""
    follow = front.jobs.follow

    async def losing(job: Any, after: str, request: Any) -> Any:
        async for event in follow(job, after, request):
            yield event
            if event is not None and event.event == "delta":  # Redis lost the job after a word
                yield JobEvent.of(None, "error", {"type": "job_lost", "message": "Redis lost the job"})
                return

    front.jobs.follow = losing  # type: ignore[method-assign]
    client = openai_of(front)
    waited = await client.responses.create(model=MODEL, input="a b c")
    assert (waited.status, waited.output_text) == ("failed", "a")
    assert waited.error is not None and "Redis lost the job" in waited.error.message
    streamed = [
        event async for event in await client.responses.create(model=MODEL, input="a b c", stream=True)
    ]
    assert [e.type for e in streamed][-5:] == ["error", *CLOSE, "response.failed"]
    failed = streamed[-1]
    assert isinstance(failed, ResponseFailedEvent) and failed.response.output_text == "a"


async def test_a_response_whose_wait_the_front_ended_is_canceled_for_its_retry(front: Front) -> None:
    front.jobs.hold = True
    waiting = asyncio.ensure_future(front.http.post("/v1/responses", json={"input": "a b"}))
    await front.jobs.submitted.wait()
    await asyncio.sleep(0.05)
    front.jobs.end_streams(STOPPING)
    answer = await waiting
    error = answer.json()["error"]
    assert answer.status_code == 503 and error["type"] == "stream_interrupted"
    # No stream to resume: the request again.
    assert error["message"] == "this front is stopping; its job is being canceled: send the request again"
    [job] = front.jobs.jobs.values()
    await settled(lambda: job.view.status == "canceled")


async def test_delete_forgets_the_response_and_cancels_a_running_one(front: Front) -> None:
    client = openai_of(front)
    front.jobs.pause_after = 1
    running = await client.responses.create(model=MODEL, input="x y z", background=True)
    deleted = await front.http.delete(f"/v1/responses/{running.id}")
    assert deleted.json() == {"id": running.id, "object": "response.deleted", "deleted": True}
    for call in (
        client.responses.retrieve(running.id),
        client.responses.delete(running.id),
        client.responses.input_items.list(running.id),
    ):
        with pytest.raises(NotFoundError):
            await call
    job = (await front.http.get(f"/v1/jobs/{running.id.removeprefix('resp_')}")).json()
    assert job["status"] == "canceled"  # the job itself stays readable until it expires
