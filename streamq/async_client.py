"""``AsyncStreamqClient``: the job API from asyncio code, with streams that resume by themselves.

The same requests, stream parser and resume policy as ``StreamqClient`` (client/protocol.py,
client/sse.py, client/resume.py); only the I/O is asynchronous."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Sequence
from types import TracebackType
from typing import Unpack

import anyio
import httpx

from shared.schemas import JobView, StreamEvent
from streamq import protocol
from streamq.errors import StreamqError
from streamq.protocol import JobOptions, Message
from streamq.resume import Backoff, ReconnectHook, ResumeState
from streamq.sse import SSEParser, asse_lines


class AsyncStreamqClient:
    """An asyncio client of one streamq front (or a load balancer in front of several).

    ``api_key`` defaults to ``STREAMQ_API_KEY`` and goes out as ``Authorization: Bearer``.
    ``events()`` re-attaches with ``Last-Event-ID`` when a stream drops, so the caller sees every
    event once; ``backoff`` says how long it keeps trying. ``max_connections``: the most open at
    once (None: no cap), streams included."""

    def __init__(
        self,
        url: str | None = None,
        *,
        api_key: str | None = None,
        backoff: Backoff | None = None,
        read_timeout: float = 60.0,
        max_connections: int | None = None,
    ) -> None:
        self.url = protocol.base_url(url)
        self.backoff = backoff or Backoff()
        self._http = httpx.AsyncClient(
            base_url=self.url,
            headers=protocol.base_headers(api_key),
            timeout=protocol.default_timeout(read_timeout),
            limits=protocol.limits(max_connections),
        )

    # ----- one request each -------------------------------------------------------------------
    async def _send(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            return await self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise protocol.unreachable(self.url, exc) from exc

    async def submit(
        self,
        messages: Sequence[Message] | None = None,
        *,
        prompt: str | None = None,
        history: Sequence[tuple[str, str]] | None = None,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> JobView:
        """Queue a job (``messages``, or ``prompt`` + ``history``); returns its view (queued).
        Sent again, with one ``Idempotency-Key`` (``idempotency_key``, else a new one), when the
        connection drops or a gateway answers 502/504 before the answer came: never two jobs."""
        body = protocol.job_body(messages, prompt, history, options)
        headers = protocol.submit_headers(idempotency_key)
        for sends in itertools.count(1):
            try:
                return protocol.job_view(await self._send("POST", "/v1/jobs", json=body, headers=headers))
            except StreamqError as exc:
                await asyncio.sleep(protocol.submit_again_in(sends, exc, self.backoff.delay(sends)))
        raise AssertionError("unreachable")

    async def status(self, job_id: str) -> JobView:
        return protocol.job_view(await self._send("GET", protocol.job_path(job_id)))

    async def cancel(self, job_id: str) -> JobView:
        """Cancel a queued or running job; StreamqError 409 (``.job`` holds it) if it had ended."""
        return protocol.job_view(await self._send("POST", protocol.job_path(job_id, "/cancel")))

    async def models(self) -> list[str]:
        return protocol.model_ids(await self._send("GET", "/v1/models"))

    # ----- streams ------------------------------------------------------------------------------
    async def events(
        self,
        job_id: str,
        *,
        last_event_id: str | None = None,
        on_reconnect: ReconnectHook | None = None,
    ) -> AsyncIterator[StreamEvent]:
        """The job's events after ``last_event_id``, each once, until its final event. A dropped
        connection or a stream cut short is re-attached with Last-Event-ID after a backoff."""
        state = ResumeState(job_id, last_event_id, self.backoff)
        while True:
            try:
                async with self._http.stream("GET", state.path, headers=state.headers()) as response:
                    if not state.opened(response.status_code):
                        if state.ended:
                            return  # 204: the final event was already received
                        await response.aread()
                        raise protocol.error_of(response)
                    parser = SSEParser()
                    async for line in asse_lines(response.aiter_text()):
                        event = parser.feed(line)
                        if event is not None:
                            state.saw(event)
                            yield event
                            if event.final:
                                return
                why = "the stream ended before the job's final event"
            except httpx.TransportError as exc:
                why = f"{exc.__class__.__name__}: {exc}"
            except StreamqError as exc:
                await asyncio.sleep(state.failed(exc, on_reconnect))
                continue
            await asyncio.sleep(state.dropped(why, on_reconnect))

    async def wait(self, job_id: str, *, on_reconnect: ReconnectHook | None = None) -> JobView:
        """Follow the job to its end; its final view (status, text, usage), whatever the end."""
        async for _ in self.events(job_id, on_reconnect=on_reconnect):
            pass
        return await self.status(job_id)

    async def chat(
        self,
        messages: Sequence[Message] | None = None,
        *,
        prompt: str | None = None,
        history: Sequence[tuple[str, str]] | None = None,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> JobView:
        """Submit and wait: the finished job's view (its answer in ``.text``). StreamqJobError when
        the job failed or was canceled; cancelled (a timeout, a task's cancel), it cancels the
        job, which no one else knows of."""
        view = await self.submit(
            messages, prompt=prompt, history=history, idempotency_key=idempotency_key, **options
        )
        try:
            return protocol.finished(await self.wait(view.id))
        except StreamqError:
            raise
        except BaseException:
            await self._abandon(view.id)
            raise

    async def _abandon(self, job_id: str) -> None:
        """Cancel a job no one will read, quickly and quietly: the caller is leaving already (a
        cancelled task: shielded, as anyio cancels every await of a cancelled scope again)."""
        with anyio.CancelScope(shield=True), contextlib.suppress(Exception):
            path = protocol.job_path(job_id, "/cancel")
            await self._send("POST", path, timeout=protocol.ABANDON_TIMEOUT)

    # ----- lifetime -------------------------------------------------------------------------------
    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncStreamqClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
