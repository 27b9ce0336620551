"""A Responses API response's record, kept beside the job that answers it.

A response **is** a streamq job: its id is ``resp_<job id>``, its status, text and usage are the
job's. What the job does not hold is kept in a record through the ``JobClient`` (in Redis: one
hash beside the job's keys, owned by the same API key, living no longer than a job may): the
request's settings that shape the response object (instructions, tools, text format, metadata,
store...), the input items as given, and the conversation so far (earlier turns of a
``previous_response_id`` chain and this input, without instructions), so that the next turn of a
chain needs only this record and this job's text.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, Field

from api.errors import ApiError
from api.job_client import JobClient
from api.responses_items import listed_items
from api.responses_schemas import ResponsesRequest
from api.tool_calls import Mode, ToolPlan, cut_short, read_whole
from shared.job_store.vocabulary import FinishReason, JobStatus
from shared.schemas import ChatMessage, FunctionCall, JobView, ToolCall

PREFIX = "resp_"
_RESPONSE_ID = re.compile(r"resp_([0-9a-f]{32})")


def response_status(view: JobView, background: bool = True) -> str:
    """The Responses API's status of a job: queued (a background response's only: a foreground
    one is in_progress from its creation, as OpenAI's are), in_progress, completed, incomplete
    (cut by its length or time limit), failed, cancelled."""
    if view.status == JobStatus.FINISHED:
        return "completed" if view.finish_reason == FinishReason.STOP else "incomplete"
    return {
        JobStatus.QUEUED: "queued" if background else "in_progress",
        JobStatus.RUNNING: "in_progress",
        JobStatus.FAILED: "failed",
        JobStatus.CANCELED: "cancelled",
    }[view.status]


class ResponseRecord(BaseModel):
    """What a response keeps beside its job (the job's id is ``id``)."""

    id: str
    model: str
    created_at: float
    background: bool = False
    detached: bool = False  # foreground, sent with X-Streamq-Detach: it runs on when its client goes
    store: bool = True
    instructions: str | None = None
    previous_response_id: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    parallel_tool_calls: bool = True
    tools: list[dict[str, Any]] = Field(default_factory=list)  # as the request gave them
    tool_choice: Any = "auto"
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}, "verbosity": "medium"})
    tool_mode: Mode = "off"  # how the job's text is read back (api.tool_calls)
    tool_function: str | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    reasoning_effort: str | None = None  # "none" where the request said so (the only effort taken)
    input_items: list[dict[str, Any]] = Field(default_factory=list)  # with ids; [] unless stored
    conversation: list[ChatMessage] = Field(default_factory=list)  # earlier turns + this input
    chain: list[str] = Field(default_factory=list)  # the job ids of the responses before it, oldest first

    @property
    def response_id(self) -> str:
        return PREFIX + self.id

    @property
    def runs_on(self) -> bool:
        """Whether it runs on without a request waiting for it (background, or detached): only
        such a response is cancelled through the Responses API, or deleted while it runs."""
        return self.background or self.detached

    def tool_plan(self) -> ToolPlan:
        return ToolPlan(self.tool_mode, function=self.tool_function)


def not_found(response_id: str, param: str = "response_id") -> ApiError:
    return ApiError(404, f"no response with id '{response_id}'", param=param, code="response_not_found")


async def load_record(
    jobs: JobClient, response_id: str, owner: str, param: str = "response_id"
) -> ResponseRecord:
    """``owner``'s response (a 404 naming ``param`` if there is none: another key's is not found)."""
    found = _RESPONSE_ID.fullmatch(response_id)
    stored = await jobs.load_response(found.group(1), owner) if found else None
    if stored is None:
        raise not_found(response_id, param)
    return ResponseRecord.model_validate_json(stored)


async def save_record(jobs: JobClient, record: ResponseRecord, owner: str) -> None:
    await jobs.save_response(record.id, owner, record.model_dump_json(exclude_defaults=True))


def new_record(
    body: ResponsesRequest,
    view: JobView,
    history: list[ChatMessage],
    chain: list[str],
    detached: bool = False,
) -> ResponseRecord:
    """The record of the response that ``body`` created as job ``view`` (``detached``: it runs on
    when its client goes)."""
    plan = body.tool_plan()
    text = {"format": {"type": "text"}, "verbosity": "medium"}
    if body.text and body.text.format:
        text["format"] = body.text.format.model_dump(by_alias=True, exclude_none=True)
    tool_choice = (
        body.tool_choice.model_dump() if not isinstance(body.tool_choice, str | None) else body.tool_choice
    )
    return ResponseRecord(
        id=view.id,
        model=view.model,
        created_at=view.created_at,
        background=bool(body.background),
        detached=detached and not body.background,
        store=body.stored,
        instructions=body.instructions,
        previous_response_id=body.previous_response_id,
        metadata=body.metadata or {},
        max_output_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        parallel_tool_calls=body.parallel_tool_calls is not False,
        tools=[tool.model_dump(exclude_none=False) for tool in body.tools or []],
        tool_choice=tool_choice or "auto",
        text=text,
        tool_mode=plan.mode,
        tool_function=plan.function,
        user=body.user,
        safety_identifier=body.safety_identifier,
        prompt_cache_key=body.prompt_cache_key,
        reasoning_effort=body.reasoning.effort if body.reasoning else None,
        input_items=listed_items(body.items(), view.id) if body.stored else [],
        conversation=body.messages(history) if body.stored else [],
        chain=chain if body.stored else [],
    )


def made_for(chain: list[str]) -> Callable[[str], bool]:
    """Whether an item id is one streamq made for a response of ``chain`` (job ids): an output
    item's (``msg_<job>_<n>``, ``fc_<job>_<n>``: api.responses_format) or an input item's listed
    without an id of its own (``msg_<job>_in<n>``...: api.responses_items). Ids a client gave
    its items are its own, and never taken for one of these."""
    if not chain:
        return lambda _: False
    made = re.compile(rf"(?:msg|fc|fco)_(?:{'|'.join(map(re.escape, chain))})_(?:in)?\d+")
    return lambda item_id: made.fullmatch(item_id) is not None


NOT_FOUND = "previous_response_not_found"  # OpenAI's code: chaining clients send the whole conversation


def _refuse_chaining(code: str, message: str) -> ApiError:
    return ApiError(400, message, param="previous_response_id", code=code)


async def earlier_turns(jobs: JobClient, previous_id: str, owner: str) -> tuple[list[ChatMessage], list[str]]:
    """The conversation that ``previous_id`` ends: its own (earlier turns and its input) and its
    answer, as an assistant turn with its tool calls; and the job ids of the chain's responses,
    ``previous_id``'s last. A 400 naming ``previous_response_id``: OpenAI's
    ``previous_response_not_found`` for one there is none of (never made, expired, deleted,
    another key's, or created with ``store: false``: clients that meet it send the whole
    conversation again), ``invalid_previous_response`` for one not finished."""
    try:
        record = await load_record(jobs, previous_id, owner, param="previous_response_id")
    except ApiError as missing:
        if missing.status != 404:
            raise
        raise _refuse_chaining(
            NOT_FOUND, f"Previous response with id '{previous_id}' not found."
        ) from missing
    if not record.store:
        raise _refuse_chaining(
            NOT_FOUND,
            f"Previous response with id '{previous_id}' not found (it was created with store: false, "
            "so it was not kept).",
        )
    view = await jobs.view(record.id, owner)
    status = response_status(view, record.background)
    if status not in ("completed", "incomplete"):
        raise _refuse_chaining(
            "invalid_previous_response",
            f"previous_response_id: response '{previous_id}' is {status}: "
            "only a finished response can be continued",
        )
    content, calls = read_whole(record.tool_plan(), record.id, view.text, cut=cut_short(view.finish_reason))
    tool_calls = [ToolCall(id=c["id"], function=FunctionCall(**c["function"])) for c in calls]
    answer = ChatMessage(role="assistant", content=content or "", tool_calls=tool_calls or None)
    return [*record.conversation, answer], [*record.chain, record.id]
