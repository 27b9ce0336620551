"""A response's objects and events, read off its job's events.

``ResponseEvents`` turns a job's stored event stream into the Responses API's events, and keeps
the response object they describe. It is a pure function of the stream: fed the same job events
(from the stream's start, on any front, before or after a worker crash), it gives the same
events with the same ``sequence_number``, numbered from 0. That is what makes ``starting_after``
work anywhere: a re-attached stream replays the job's stream from its start and skips the events
numbered up to N. Live queue positions (events without an id) and the ``queued`` / ``started``
pair a requeued job writes again are not events of the response.

The job's events map as follows (``n`` counts output items):

- its first ``queued``: ``response.created`` then, for a background response,
  ``response.queued`` (status queued), and its first ``started`` ``response.in_progress``; a
  foreground response is ``in_progress`` from the start, as OpenAI's are (never ``queued``):
  ``response.created`` then ``response.in_progress``, whether its job waits in the queue or not;
- ``delta``: text, read through ``api.tool_calls.ToolCallReader`` as on the chat route: content
  opens a message item (``response.output_item.added``, ``response.content_part.added``) and goes
  out as ``response.output_text.delta``; a tool call opens a ``function_call`` item, its
  arguments go out as ``response.function_call_arguments.delta``; a new item closes the open one
  (``...output_text.done``, ``...content_part.done`` / ``...function_call_arguments.done``, then
  ``response.output_item.done``);
- ``done``: what the reader held back, the open item closed, then ``response.completed`` (a stop)
  or ``response.incomplete`` (cut by max_output_tokens or the job's time limit), with usage;
- ``error``: an ``error`` event, then ``response.failed``; ``canceled``: ``response.cancelled``.

Item ids derive from the job id and the item's place (``msg_<job>_<n>``, ``fc_<job>_<n>``), call
ids as on the chat route (``call_<job>_<k>``), so a replay names everything the same way.
"""

from __future__ import annotations

import copy
from typing import Any

from api.errors import ApiError, job_failure_error
from api.job_client import JobEvent
from api.responses_schemas import named_as_sent
from api.responses_store import ResponseRecord, response_status
from api.stream_hub import parse_entry_id
from api.tool_calls import ToolCallReader, cut_short
from shared.job_store.payloads import encode
from shared.job_store.vocabulary import EventName, FinishReason, JobStatus
from shared.schemas import JobView

Obj = dict[str, Any]
PING = b": ping\n"  # a comment line of the next event's block: never a block without data
_LIFECYCLE = {
    "completed": "response.completed",
    "incomplete": "response.incomplete",
    "failed": "response.failed",
    "cancelled": "response.cancelled",
}


def sse_event(event: Obj, name: str | None = None) -> bytes:
    """One Server-Sent Event as OpenAI sends them: named by its type (or ``name``), no id."""
    return f"event: {name or event['type']}\ndata: {encode(event)}\n\n".encode()


def usage_object(prompt_tokens: int, completion_tokens: int) -> Obj:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _error_object(data: Obj) -> Obj:
    """A failed job's error as a response's: OpenAI's code, streamq's type and message."""
    kind = str(data.get("type") or "generation_error")
    code = "invalid_prompt" if kind == "invalid_request_error" else "server_error"
    return {"code": code, "message": str(data.get("message") or "the job failed"), "type": kind}


def _seconds(event_id: str | None) -> int | None:
    """When a stream entry was written (its id is the time in milliseconds)."""
    return parse_entry_id(event_id)[0] // 1000 if event_id else None


class ResponseEvents:
    """The response of one job, as its events come (see the module's docstring)."""

    def __init__(self, record: ResponseRecord) -> None:
        self.record = record
        self._reader = ToolCallReader(record.tool_plan(), record.id)
        self._forced_call = record.tool_plan().forces_call
        self._next = 0  # the next sequence number
        self._events: list[Obj] = []  # what the event being fed gives
        # OpenAI's own: only a background response is ever "queued"; a foreground one is
        # in_progress from its creation (its job may still wait in streamq's queue).
        self.status = "queued" if record.background else "in_progress"
        self.output: list[Obj] = []
        self._index: dict[str, int] = {}  # item id → its place in output
        self._open: Obj | None = None  # the item being written
        self._created = False
        self.usage: Obj | None = None
        self.error: Obj | None = None
        self.failure: ApiError | None = None  # a failed job's error, as an HTTP error would say it
        self.incomplete: Obj | None = None
        self.completed_at: int | None = None

    @property
    def final(self) -> bool:
        return self.status in _LIFECYCLE

    # ----- the response object ------------------------------------------------------------------
    def response(self) -> Obj:
        """The response object as the events so far describe it."""
        r = self.record
        return {
            "id": r.response_id,
            "object": "response",
            "created_at": int(r.created_at),
            "status": self.status,
            "background": r.background,
            "completed_at": self.completed_at if self.status == "completed" else None,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "instructions": r.instructions,
            "max_output_tokens": r.max_output_tokens,
            "max_tool_calls": None,
            "metadata": r.metadata,
            "model": r.model,
            "output": copy.deepcopy(self.output),
            "parallel_tool_calls": r.parallel_tool_calls,
            "previous_response_id": r.previous_response_id,
            "prompt_cache_key": r.prompt_cache_key,
            "reasoning": {"effort": r.reasoning_effort, "summary": None},
            "safety_identifier": r.safety_identifier,
            "service_tier": "default",
            "store": r.store,
            "temperature": 1.0 if r.temperature is None else r.temperature,
            "text": r.text,
            "tool_choice": r.tool_choice,
            "tools": r.tools,
            "top_logprobs": 0,
            "top_p": 1.0 if r.top_p is None else r.top_p,
            "truncation": "disabled",
            "usage": self.usage,
            "user": r.user,
        }

    # ----- the job's events ---------------------------------------------------------------------
    def feed(self, event: JobEvent) -> list[Obj]:
        """The response's events for one of the job's stored events (none for a live position)."""
        self._events = []
        # An event without an id is a live position update, or the final error of a job Redis
        # lost (``job_lost``): that one ends the response.
        if self.final or (event.id is None and not event.final):
            return []
        if not self._created:
            self._created = True
            self._lifecycle("response.created")
            self._lifecycle("response.queued" if self.status == "queued" else "response.in_progress")
        if event.event in (EventName.STARTED, EventName.DELTA) and self.status == "queued":
            self.status = "in_progress"
            self._lifecycle("response.in_progress")
        if event.event == EventName.DELTA:
            self._deltas(self._reader.feed(str(event.data.get("text") or "")))
        elif event.event == EventName.DONE:
            self._deltas(self._reader.finish(cut=cut_short(event.data.get("finish_reason"))))
            usage = event.data.get("usage") or {}
            self.usage = usage_object(
                int(usage.get("prompt_tokens", 0)), int(usage.get("completion_tokens", 0))
            )
            if event.data.get("finish_reason") == FinishReason.STOP:
                self._end("completed", event.id)
            else:  # a length cut (or the job's time limit, reported as OpenAI knows it)
                self.incomplete = {"reason": "max_output_tokens"}
                self._end("incomplete", event.id)
        elif event.event == EventName.ERROR:
            failure = named_as_sent(job_failure_error(event.event, event.data), self._forced_call)
            self.failure = failure
            self.error = _error_object(event.data) | {"message": failure.message}
            # The event's code is free text (the error object's is one of OpenAI's few): the job's own.
            code = failure.code or self.error["code"]
            self._emit("error", code=code, message=failure.message, param=failure.param)
            self._end("failed", event.id)
        elif event.event == EventName.CANCELED:
            self._end("cancelled", event.id)
        return self._events

    def _emit(self, kind: str, **fields: Any) -> None:
        self._events.append({"type": kind, "sequence_number": self._next, **fields})
        self._next += 1

    def _lifecycle(self, kind: str) -> None:
        self._emit(kind, response=self.response())

    def _end(self, status: str, event_id: str | None) -> None:
        self._close("completed" if status == "completed" else "incomplete")
        self.status = status
        self.completed_at = _seconds(event_id)
        self._lifecycle(_LIFECYCLE[status])

    # ----- output items -------------------------------------------------------------------------
    def _deltas(self, deltas: list[Obj]) -> None:
        for delta in deltas:
            if "content" in delta:
                self._text(delta["content"])
            for call in delta.get("tool_calls", []):
                if "id" in call:  # a new call
                    self._close("completed")
                    self._add(
                        {"type": "function_call", "call_id": call["id"], "name": call["function"]["name"]}
                    )
                self._arguments(call["function"].get("arguments") or "")

    def _where(self, item: Obj) -> Obj:
        return {"item_id": item["id"], "output_index": self._index[item["id"]]}

    def _add(self, fields: Obj) -> Obj:
        n = len(self.output)
        prefix = "msg" if fields["type"] == "message" else "fc"
        item = {"id": f"{prefix}_{self.record.id}_{n}", **fields, "status": "in_progress"}
        if fields["type"] == "function_call":
            item["arguments"] = ""
        self.output.append(item)
        self._index[item["id"]] = n
        self._open = item
        self._emit("response.output_item.added", output_index=n, item=copy.deepcopy(item))
        return item

    def _text(self, text: str) -> None:
        item = self._open
        if item is None or item["type"] != "message":
            self._close("completed")
            item = self._add({"type": "message", "role": "assistant", "content": []})
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item["content"].append(part)
            self._emit("response.content_part.added", **self._where(item), content_index=0, part=dict(part))
        item["content"][0]["text"] += text
        self._emit(
            "response.output_text.delta", **self._where(item), content_index=0, delta=text, logprobs=[]
        )

    def _arguments(self, text: str) -> None:
        item = self._open
        if item is None or item["type"] != "function_call" or not text:
            return
        item["arguments"] += text
        self._emit("response.function_call_arguments.delta", **self._where(item), delta=text)

    def _close(self, status: str) -> None:
        item, self._open = self._open, None
        if item is None:
            return
        item["status"] = status
        where = self._where(item)
        if item["type"] == "message":
            part = item["content"][0]
            self._emit("response.output_text.done", **where, content_index=0, text=part["text"], logprobs=[])
            self._emit("response.content_part.done", **where, content_index=0, part=dict(part))
        else:
            self._emit(
                "response.function_call_arguments.done",
                **where,
                arguments=item["arguments"],
                name=item["name"],
            )
        self._emit("response.output_item.done", output_index=where["output_index"], item=copy.deepcopy(item))


def _entry_id(at: float | None) -> str:
    return f"{int((at or 0) * 1000)}-0"


def response_of(record: ResponseRecord, view: JobView) -> Obj:
    """The response object of a job as it is now (``GET /v1/responses/{id}``): its view's text
    read as one delta through the same mapping as its stream, so the items are the same."""
    events = ResponseEvents(record)
    events.feed(JobEvent.of(_entry_id(view.created_at), EventName.QUEUED, {}))
    if view.status != JobStatus.QUEUED and view.started_at is not None:
        events.feed(JobEvent.of(_entry_id(view.started_at), EventName.STARTED, {}))
    if view.text:
        events.feed(JobEvent.of(_entry_id(view.started_at), EventName.DELTA, {"text": view.text}))
    end = _entry_id(view.finished_at)
    status = response_status(view)
    if status in ("completed", "incomplete"):
        usage = view.usage.model_dump()
        events.feed(JobEvent.of(end, EventName.DONE, {"finish_reason": view.finish_reason, "usage": usage}))
    elif status == "failed":
        error = view.error.model_dump() if view.error else {}
        events.feed(JobEvent.of(end, EventName.ERROR, error))
    elif status == "cancelled":
        events.feed(JobEvent.of(end, EventName.CANCELED, {}))
    return events.response()


def item_list(items: list[Obj], after: str | None, limit: int, order: str) -> Obj:
    """A page of input items, OpenAI's list shape (``after``: the id the previous page ended at)."""
    ordered = items if order == "asc" else items[::-1]
    ids = [item["id"] for item in ordered]
    if after is not None and after not in ids:
        raise ApiError(400, f"'{after}' is not an input item of this response", param="after")
    start = ids.index(after) + 1 if after is not None else 0
    page = ordered[start : start + limit]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": start + limit < len(ordered),
    }
