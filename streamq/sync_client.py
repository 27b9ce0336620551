"""``StreamqClient``: the job API from synchronous code, with streams that resume by themselves."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator, Sequence
from types import TracebackType
from typing import Unpack

import httpx

from shared.schemas import JobView, StreamEvent
from streamq import protocol
from streamq.errors import StreamqError
from streamq.protocol import JobOptions, Message
from streamq.resume import Backoff, ReconnectHook, ResumeState
from streamq.sse import SSEParser, sse_lines


class StreamqClient:
    """A client of one streamq front (or a load balancer in front of several).

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
        self._http = httpx.Client(
            base_url=self.url,
            headers=protocol.base_headers(api_key),
            timeout=protocol.default_timeout(read_timeout),
            limits=protocol.limits(max_connections),
        )

    # ----- one request each -------------------------------------------------------------------
    def _send(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        try:
            return self._http.request(method, path, **kwargs)  # type: ignore[arg-type]
        except httpx.TransportError as exc:
            raise protocol.unreachable(self.url, exc) from exc

    def submit(
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
                return protocol.job_view(self._send("POST", "/v1/jobs", json=body, headers=headers))
            except StreamqError as exc:
                time.sleep(protocol.submit_again_in(sends, exc, self.backoff.delay(sends)))
        raise AssertionError("unreachable")

    def status(self, job_id: str) -> JobView:
        return protocol.job_view(self._send("GET", protocol.job_path(job_id)))

    def cancel(self, job_id: str) -> JobView:
        """Cancel a queued or running job; StreamqError 409 (``.job`` holds it) if it had ended."""
        return protocol.job_view(self._send("POST", protocol.job_path(job_id, "/cancel")))

    def models(self) -> list[str]:
        return protocol.model_ids(self._send("GET", "/v1/models"))

    # ----- streams ------------------------------------------------------------------------------
    def events(
        self,
        job_id: str,
        *,
        last_event_id: str | None = None,
        on_reconnect: ReconnectHook | None = None,
    ) -> Iterator[StreamEvent]:
        """The job's events after ``last_event_id``, each once, until its final event. A dropped
        connection or a stream cut short is re-attached with Last-Event-ID after a backoff."""
        state = ResumeState(job_id, last_event_id, self.backoff)
        while True:
            try:
                with self._http.stream("GET", state.path, headers=state.headers()) as response:
                    if not state.opened(response.status_code):
                        if state.ended:
                            return  # 204: the final event was already received
                        response.read()
                        raise protocol.error_of(response)
                    parser = SSEParser()
                    for line in sse_lines(response.iter_text()):
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
                time.sleep(state.failed(exc, on_reconnect))
                continue
            time.sleep(state.dropped(why, on_reconnect))

    def wait(self, job_id: str, *, on_reconnect: ReconnectHook | None = None) -> JobView:
        """Follow the job to its end; its final view (status, text, usage), whatever the end."""
        for _ in self.events(job_id, on_reconnect=on_reconnect):
            pass
        return self.status(job_id)

    def chat(
        self,
        messages: Sequence[Message] | None = None,
        *,
        prompt: str | None = None,
        history: Sequence[tuple[str, str]] | None = None,
        idempotency_key: str | None = None,
        **options: Unpack[JobOptions],
    ) -> JobView:
        """Submit and wait: the finished job's view (its answer in ``.text``). StreamqJobError when
        the job failed or was canceled; interrupted (Ctrl-C), it cancels the job, which no one
        else knows of."""
        view = self.submit(
            messages, prompt=prompt, history=history, idempotency_key=idempotency_key, **options
        )
        try:
            return protocol.finished(self.wait(view.id))
        except StreamqError:
            raise
        except BaseException:
            self._abandon(view.id)
            raise

    def _abandon(self, job_id: str) -> None:
        """Cancel a job no one will read, quickly and quietly: the caller is leaving already."""
        with contextlib.suppress(Exception):
            self._send("POST", protocol.job_path(job_id, "/cancel"), timeout=protocol.ABANDON_TIMEOUT)

    # ----- lifetime -------------------------------------------------------------------------------
    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> StreamqClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
