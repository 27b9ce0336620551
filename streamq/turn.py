"""One answer as a client follows it: what has arrived, where the job stands, how it ended.
Pure state (no I/O), fed with the job's events; the terminal renderers draw it."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.job_store.vocabulary import FINAL_EVENTS, EventName
from shared.schemas import DoneEvent, JobError, StreamEvent


@dataclass
class Turn:
    job_id: str
    text: str = ""
    phase: str = "queued"  # queued · running · done · error · canceled
    position: int | None = None
    estimated_wait: float | None = None
    last_event_id: str | None = None
    reconnecting: str | None = None  # why, while the client re-attaches
    reconnects: int = 0
    stopping: bool = False  # a cancel was asked for
    done: DoneEvent | None = None
    error: JobError | None = None
    chunks: list[str] = field(default_factory=list)  # new text not yet drawn

    @property
    def ended(self) -> bool:
        return self.phase in FINAL_EVENTS  # the phase after a final event is named as the event

    def apply(self, event: StreamEvent) -> None:
        self.reconnecting = None
        if event.event == EventName.QUEUED:
            self.phase = "queued"
            self.position = event.position
            wait = event.data.get("estimated_wait_seconds")
            self.estimated_wait = float(wait) if isinstance(wait, int | float) else None
        elif event.event == EventName.STARTED:
            self.phase = "running"
        elif event.event == EventName.DELTA:
            self.phase = "running"
            self.text += event.text
            self.chunks.append(event.text)
        elif event.event == EventName.DONE:
            self.phase, self.done = "done", event.done()
        elif event.event == EventName.ERROR:
            self.phase, self.error = "error", event.job_error()
        elif event.event == EventName.CANCELED:
            self.phase = "canceled"
        # Last: a Ctrl-C between the two would re-follow from an event whose text it never kept.
        if event.id is not None:
            self.last_event_id = event.id

    def on_reconnect(self, attempt: int, wait: float, why: str) -> None:
        """The client's reconnect hook: the stream dropped and is being re-attached."""
        self.reconnects += 1
        self.reconnecting = f"connection lost, reconnecting (try {attempt}, in {wait:.1f} s)"

    def take_chunks(self) -> str:
        new, self.chunks = "".join(self.chunks), []
        return new

    def status_line(self) -> str:
        """What the job is doing, in a few words, while it runs."""
        if self.stopping:
            return "stopping…"
        if self.reconnecting:
            return self.reconnecting
        if self.phase == "queued":
            if self.position is None:
                return "queued, waiting for a worker"
            ahead = "no job" if self.position == 0 else f"{self.position} job{'s' * (self.position > 1)}"
            eta = f" · about {self.estimated_wait:.0f} s" if self.estimated_wait is not None else ""
            return f"queued · {ahead} ahead{eta}"
        return "generating · Ctrl-C to stop"

    def summary(self) -> str:
        """One line on how the answer ended, with the job id (to look it up later)."""
        return self._ending() + (f" · {self.reconnects} reconnect(s)" if self.reconnects else "")

    def _ending(self) -> str:
        if self.phase == "done" and self.done is not None:
            d = self.done
            speed = d.timings.tokens_per_second
            rate = f" · {speed:.1f} tok/s" if speed else ""
            return (
                f"{d.finish_reason} · {d.usage.completion_tokens} tokens"
                f" · {d.timings.generation_seconds:.1f} s{rate} · job {self.job_id}"
            )
        if self.phase == "canceled":
            return f"stopped · job {self.job_id} canceled"
        if self.phase == "error":
            err = self.error
            what = f"{err.type}: {err.message}" if err else "the job failed"
            return f"failed · {what} · job {self.job_id}"
        return f"job {self.job_id}: {self.phase}"
