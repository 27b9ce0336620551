"""The load the failover tests put through a Sentinel-managed stack: clients that submit (retrying
503s) and follow their jobs to the end, resuming with Last-Event-ID on the other front, and the
audit of what they saw: every job that got a 202 ended, its stream spells the stored answer with
no gap and no repeat, and new jobs work on every front."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import httpx

from harness.redis_sentinel import SentinelRedis
from harness.services import Service, wait_for
from tests.sse import follow, read_events, text_of

TOKENS = 60  # per job: 1.5 s at 40 tokens/s, so jobs are mid-stream when the primary dies
FINAL = ("done", "error", "canceled")


@dataclass
class HaStack:
    ha: SentinelRedis
    urls: list[str]
    services: list[Service]


@dataclass
class Client:
    """One user: submits a job (retrying 503s), then follows it to its end, resuming with
    Last-Event-ID on the other front whenever the stream breaks."""

    urls: list[str]
    index: int
    job_id: str | None = None
    event_ids: list[str] = field(default_factory=list)
    deltas: list[str] = field(default_factory=list)
    final: str | None = None
    error: dict[str, str] | None = None
    resumes: int = 0
    refused: int = 0
    delta_times: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def run(self, deadline: float) -> None:
        try:
            with httpx.Client(timeout=httpx.Timeout(10, read=5)) as client:
                self._submit(client, deadline)
                if self.job_id is not None:
                    self._follow(client, deadline)
        except Exception as exc:  # reported by the test
            self.problems.append(f"{type(exc).__name__}: {exc}")

    def _submit(self, client: httpx.Client, deadline: float) -> None:
        body = {"prompt": f"client {self.index}", "max_tokens": TOKENS}
        while time.monotonic() < deadline:
            try:
                r = client.post(f"{self.urls[self.index % 2]}/v1/jobs", json=body)
            except httpx.HTTPError:
                r = None
            if r is not None and r.status_code == 202:
                self.job_id = r.json()["id"]
                return
            if r is not None and r.status_code != 503:
                self.problems.append(f"submit: {r.status_code} {r.text}")
                return
            self.refused += 1
            time.sleep(0.2)

    def _follow(self, client: httpx.Client, deadline: float) -> None:
        attempt = 0
        while self.final is None and time.monotonic() < deadline:
            url = self.urls[(self.index + attempt) % 2]
            attempt += 1
            headers = {"Last-Event-ID": self.event_ids[-1]} if self.event_ids else {}
            try:
                with client.stream("GET", f"{url}/v1/jobs/{self.job_id}/events", headers=headers) as r:
                    if r.status_code != 200:
                        r.read()
                        if r.status_code != 503:
                            self.problems.append(f"resume: {r.status_code} {r.text}")
                            return
                    else:
                        self._read(r)
            except httpx.HTTPError:
                pass
            if self.final is None:
                self.resumes += 1
                time.sleep(0.2)

    def _read(self, response: httpx.Response) -> None:
        for event in read_events(response):
            if event is None:
                continue
            if event.id is not None:
                self.event_ids.append(event.id)
            if event.event == "delta":
                self.deltas.append(event.data["text"])
                self.delta_times.append(time.monotonic())
            if event.event in FINAL:
                self.final = event.event
                self.error = event.data if event.event == "error" else None
                return


def load_through(ha_stack: HaStack, fail: Callable[[], object]) -> tuple[list[Client], float, str]:
    """24 clients: the first 12 stream when ``fail()`` runs, the other 12 submit during it (503s,
    retried, until the new primary takes writes). Returns them, when ``fail`` began, and the clean
    run's text."""
    urls = ha_stack.urls
    with httpx.Client(timeout=30) as client:
        clean = client.post(f"{urls[0]}/v1/jobs", json={"prompt": "clean", "max_tokens": TOKENS})
        assert clean.status_code == 202, clean.text
        reference = text_of(follow(client, urls[0], clean.json()["id"]))
        assert reference
    deadline = time.monotonic() + 120
    clients = [Client(urls, i) for i in range(24)]
    threads = [threading.Thread(target=c.run, args=(deadline,), daemon=True) for c in clients]
    for thread in threads[:12]:
        thread.start()
    wait_for(lambda: sum(bool(c.deltas) for c in clients[:12]) >= 8, 30, "streams under way")
    began = time.monotonic()

    # The second wave starts while the primary is down (``fail`` returns once all is in sync).
    def start_second_wave() -> None:
        for thread in threads[12:]:
            thread.start()

    second_wave = threading.Timer(0.3, start_second_wave)
    second_wave.start()
    fail()
    second_wave.join()
    for thread in threads:
        thread.join(max(1.0, deadline - time.monotonic()))
    return clients, began, reference


def audit(ha_stack: HaStack, clients: list[Client], reference: str) -> None:
    """Every job that got a 202 ended, and the job API agrees (none queued or running); a finished
    one's stream, across its resumes, spells the stored answer with no gap and no repeat, and it is
    the clean run's; and the fronts serve new jobs with no restart."""
    urls = ha_stack.urls
    problems = {c.index: c.problems for c in clients if c.problems}
    assert not problems, problems
    assert all(c.job_id is not None for c in clients)
    with httpx.Client(timeout=30) as client:
        for c in clients:
            assert c.final is not None, (c.index, c.job_id, c.resumes)
            view = answered(partial(client.get, f"{urls[0]}/v1/jobs/{c.job_id}")).json()
            assert view.get("status") in ("finished", "failed"), (c.index, c.final, c.resumes, view)
            if c.final == "done":
                assert "".join(c.deltas) == view["text"] == reference, (c.index, c.resumes, c.deltas, view)
            else:
                assert c.error is not None and c.error["message"], c.error
            assert len(c.event_ids) == len(set(c.event_ids)), "an event was delivered twice"
        assert sum(c.final == "done" for c in clients) >= len(clients) - 2
        for url in urls:
            job = answered(partial(client.post, f"{url}/v1/jobs", json={"prompt": "after", "max_tokens": 5}))
            assert job.status_code == 202, job.text
            assert follow(client, url, job.json()["id"])[-1].event == "done"
    assert all(s.alive() for s in ha_stack.services)


def answered(call: Callable[[], httpx.Response], within: float = 15) -> httpx.Response:
    """``call()``, again after its Retry-After while it is a 503 (the old primary, back as a
    replica, is still loading; a sentinel has not caught up), as a client does."""
    deadline = time.monotonic() + within
    while (r := call()).status_code == 503 and time.monotonic() < deadline:
        time.sleep(float(r.headers.get("Retry-After", "1")))
    return r


def first_tokens_after(clients: list[Client], began: float) -> list[float]:
    """Seconds from ``began`` to each running stream's first token after it."""
    after = [[t for t in c.delta_times if t > began] for c in clients[:12]]
    return [min(times) - began for times in after if times]
