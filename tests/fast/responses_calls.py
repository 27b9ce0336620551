"""What the fast tier's Responses tests share: the fake model's name, a function tool, the
first and closing events of a message, and reading a response's job request and events."""

from __future__ import annotations

from typing import Any

from openai import AsyncOpenAI
from openai.types.responses import FunctionToolParam

from shared.schemas import GenerationRequest
from tests.fast.conftest import Front

MODEL = "fake-model"

ADD: FunctionToolParam = {
    "type": "function",
    "name": "add",
    "description": "adds",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}},
    "strict": None,
}

PLAIN = [  # a foreground response, as OpenAI's: in_progress from its creation (never queued)
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
]

CLOSE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


def job_request(front: Front, response_id: str) -> GenerationRequest:
    """What the response's job was given."""
    return front.jobs.jobs[response_id.removeprefix("resp_")].request


def turns(front: Front, response_id: str) -> list[tuple[str, str]]:
    return [(m.role, m.content) for m in job_request(front, response_id).messages]


async def events_of(client: AsyncOpenAI, response_id: str, after: int | None = None) -> list[Any]:
    if after is None:
        stream = await client.responses.retrieve(response_id, stream=True)
    else:
        stream = await client.responses.retrieve(response_id, stream=True, starting_after=after)
    return [event async for event in stream]
