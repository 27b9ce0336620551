"""The chaos soak's load (bench/chaos.py): the clean runs, and the clients.

The load: client threads, each looping over the kinds of request users send, through either
front, keeping what it saw of every job: its id, the text it put together, the event ids, how
the job ended for it.

A send that was surely not accepted (no connection; 503 or 429 with no job id) is sent again,
to the other front. One whose reply was lost after it went out may have made a job the client
never learns of (``unsure``; the audit finds such jobs in Redis). A job followed by the job API
is followed to its end, resuming with Last-Event-ID on the other front; one that an OpenAI or
seed route was carrying ends for its client as "interrupted" when that request breaks.
"""

from __future__ import annotations

import itertools
import json
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.chaos_stack import MODEL
from shared.job_store.vocabulary import FINAL_STATUSES
from streamq.sse import SSEParser, sse_lines
from worker.synthetic import WORDS

CLIENTS = 8
KINDS = ("sse", "poll", "cancel", "openai-stream", "openai", "seed-stream", "seed")
SIZES = (20, 60, 120)  # max_tokens: 0.5 to 3 s at 40 tokens/s
SEED_HISTORY = [["hi", "hello"]]
# The synthetic backend counts a message as its words + 4: three one-word messages are 15 tokens,
# so max_length = 15 + n leaves room for n new tokens (the front checks it against the count).
SEED_PROMPT_TOKENS = 15
JOB_HEADER = "X-Streamq-Job-Id"
MARKER = "<^>"
NOT_ACCEPTED = (429, 503)


@dataclass
class Job:
    """One request of the load, as its client saw it."""

    kind: str
    size: int
    client: int
    job_id: str | None = None
    text: str = ""  # deltas read, chunks' last answer, or the whole answer / the polled text
    event_ids: list[str] = field(default_factory=list)
    delta_times: list[float] = field(default_factory=list)  # monotonic, one per delta read
    finals: int = 0  # final events read (done, error, canceled, [DONE])
    outcome: str | None = None  # done/error/canceled (events), finished/failed/canceled (polled), interrupted
    detail: str = ""  # the error as the client got it, or why it was interrupted
    accepted_at: float | None = None  # monotonic: when the client learned the job id
    ended_at: float | None = None
    resumes: int = 0
    retries: int = 0  # sends not accepted, sent again
    unsure: int = 0  # sends whose reply was lost: a job may exist that the client never learned of
    cancel_asked: bool = False
    disorder: str = ""  # an event id not above the last, a seed chunk that does not extend the last
    problems: list[str] = field(default_factory=list)

    def end(self, outcome: str, detail: str = "") -> None:
        self.outcome, self.detail, self.ended_at = outcome, detail, time.monotonic()

    def error(self, kind: str | None, message: str | None) -> None:
        """An error answer or event: a stream cut by the front (the job runs on), or the job's own."""
        self.end("interrupted" if kind == "stream_interrupted" else "error", f"{kind}: {message}")


def seed_body(prompt: str, size: int) -> dict[str, Any]:
    """The seed's request. The synthetic backend stops at max_tokens only (it does not apply
    max_length), so both are sent: the same answer as a model would give under max_length."""
    body = {"prompt": prompt, "history": SEED_HISTORY, "max_length": SEED_PROMPT_TOKENS + size}
    return body | {"max_tokens": size, "top_p": 0.7, "temperature": 0.0}


def clean_text(tokens: int) -> str:
    """The synthetic backend's answer of ``tokens`` tokens (worker/synthetic.py's rule)."""
    return "".join(WORDS[n % len(WORDS)] + " " for n in range(1, tokens + 1))


def clean_runs(url: str) -> dict[tuple[str, int], str]:
    """Each size's answer, on the job API and on the seed's route, before any chaos."""
    reference = {}
    with httpx.Client(timeout=60) as http:
        for size in SIZES:
            body = {"model": MODEL, "prompt": "clean", "max_tokens": size, "temperature": 0}
            job_id = http.post(f"{url}/v1/jobs", json=body).raise_for_status().json()["id"]
            while (view := http.get(f"{url}/v1/jobs/{job_id}").json())["status"] not in FINAL_STATUSES:
                time.sleep(0.1)
            reference["jobs", size] = view["text"]
            answer = http.post(f"{url}/", json=seed_body("clean", size)).raise_for_status()
            reference["seed", size] = answer.json()["response"]
    return reference


def entry(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def api_error(r: httpx.Response) -> tuple[str, str]:
    """(type, message) of an error answer."""
    try:
        error = r.json()["error"]
        return str(error.get("type")), str(error.get("message"))
    except (ValueError, KeyError, TypeError):
        return f"HTTP {r.status_code}", r.text[:200]


class Load:
    """``clients`` threads sending requests until ``stop``; ``jobs`` holds each request's view."""

    def __init__(self, urls: list[str], clients: int, seed: int) -> None:
        self.urls = urls
        self.clients = clients
        self.seed = seed
        self.jobs: list[Job] = []
        self.stopping = threading.Event()  # set: no new request; the ones under way go on
        self.deadline = float("inf")  # then: the last moment a client still waits for its job
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, grace: float) -> int:
        """Stop sending; wait up to ``grace`` seconds for the requests under way. Returns how many
        clients were still waiting."""
        self.deadline = time.monotonic() + grace
        self.stopping.set()
        for thread in self._threads:
            thread.join(max(0.1, self.deadline - time.monotonic()))
        return sum(t.is_alive() for t in self._threads)

    def _alive(self) -> bool:
        return time.monotonic() < self.deadline

    def _url(self, job: Job, attempt: int) -> str:
        return self.urls[(job.client + attempt) % len(self.urls)]

    def _client(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        timeout = httpx.Timeout(10, read=60)  # a whole answer may wait for a worker to come back
        with httpx.Client(timeout=timeout) as http:
            for n in itertools.count(index):
                if self.stopping.is_set():
                    return
                job = Job(KINDS[n % len(KINDS)], rng.choice(SIZES), index)
                try:
                    getattr(self, "_" + job.kind.replace("-", "_"))(http, job, rng)
                except Exception as exc:  # reported by the audit
                    job.problems.append(f"{type(exc).__name__}: {exc}")
                if job.job_id or job.outcome or job.problems or job.unsure:
                    with self._lock:
                        self.jobs.append(job)

    # ----- the job API ---------------------------------------------------------------------------
    def _job_body(self, job: Job) -> dict[str, Any]:
        return {"model": MODEL, "prompt": f"chaos {job.kind}", "max_tokens": job.size, "temperature": 0}

    def _submit(self, http: httpx.Client, job: Job) -> None:
        """POST /v1/jobs until a 202 (then ``job.job_id`` is set), or stopping."""
        for attempt in itertools.count():
            if self.stopping.is_set():
                return
            r = None
            try:
                r = http.post(f"{self._url(job, attempt)}/v1/jobs", json=self._job_body(job))
            except httpx.ConnectError:
                pass
            except httpx.HTTPError:
                job.unsure += 1
            if r is not None and r.status_code == 202:
                job.job_id, job.accepted_at = r.json()["id"], time.monotonic()
                return
            if r is not None and r.status_code not in NOT_ACCEPTED:
                job.problems.append(f"submit: HTTP {r.status_code} {r.text[:200]}")
                return
            job.retries += 1
            time.sleep(0.2)

    def _sse(self, http: httpx.Client, job: Job, rng: random.Random) -> None:
        self._submit(http, job)
        attempt = 0
        while job.job_id and job.outcome is None and self._alive():
            headers = {"Last-Event-ID": job.event_ids[-1]} if job.event_ids else {}
            url = f"{self._url(job, attempt)}/v1/jobs/{job.job_id}/events"
            attempt += 1
            try:
                with http.stream("GET", url, headers=headers, timeout=httpx.Timeout(10, read=5)) as r:
                    if r.status_code == 200:
                        self._read_events(r, job)
                    else:
                        r.read()
                        if r.status_code != 503:
                            job.problems.append(f"follow: HTTP {r.status_code} {r.text[:200]}")
                            return
            except httpx.HTTPError:
                pass
            if job.outcome is None:
                job.resumes += 1
                time.sleep(0.2)

    def _read_events(self, r: httpx.Response, job: Job) -> None:
        parser = SSEParser()
        for line in sse_lines(r.iter_text()):
            event = parser.feed(line)
            if event is None:
                continue
            if event.id is not None:
                if job.event_ids and entry(event.id) <= entry(job.event_ids[-1]) and not job.disorder:
                    job.disorder = f"event id {event.id} after {job.event_ids[-1]}"
                job.event_ids.append(event.id)
            if event.event == "delta":
                job.text += event.text
                job.delta_times.append(time.monotonic())
            elif event.final:
                job.finals += 1
                error = event.job_error()
                job.end(event.event, f"{error.type}: {error.message}" if error else "")
                return

    def _poll(self, http: httpx.Client, job: Job, rng: random.Random) -> None:
        self._submit(http, job)
        self._poll_to_end(http, job)

    def _call(self, http: httpx.Client, job: Job, method: str, path: str) -> httpx.Response | None:
        """A job API call, through one front then the other, until an answer that is not a 503."""
        for attempt in itertools.count():
            if not self._alive():
                return None
            try:
                r = http.request(method, f"{self._url(job, attempt)}/v1/jobs/{job.job_id}{path}")
                if r.status_code != 503:
                    return r
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return None

    def _poll_to_end(self, http: httpx.Client, job: Job) -> None:
        while job.job_id and (r := self._call(http, job, "GET", "")) is not None:
            if r.status_code != 200:
                job.problems.append(f"poll: HTTP {r.status_code} {r.text[:200]}")
                return
            view = r.json()
            if view["status"] in FINAL_STATUSES:
                error = view.get("error") or {}
                job.text = view["text"]
                job.end(view["status"], f"{error['type']}: {error['message']}" if error else "")
                return
            time.sleep(0.25)

    def _cancel(self, http: httpx.Client, job: Job, rng: random.Random) -> None:
        job.size = SIZES[-1]
        self._submit(http, job)
        if not job.job_id:
            return
        time.sleep(rng.uniform(0.1, 1.5))
        job.cancel_asked = True
        r = self._call(http, job, "POST", "/cancel")
        if r is not None and r.status_code not in (200, 409):  # 409: it had ended before
            job.problems.append(f"cancel: HTTP {r.status_code} {r.text[:200]}")
        self._poll_to_end(http, job)

    # ----- routes that carry their job: OpenAI's and the seed's ------------------------------------
    def _openai_body(self, job: Job, stream: bool) -> dict[str, Any]:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"chaos {job.kind}"}]}
        return body | {"max_tokens": job.size, "temperature": 0, "stream": stream}

    def _carried(self, http: httpx.Client, job: Job, path: str, body: dict[str, Any], stream: bool) -> None:
        """Send until accepted; read the answer (or the stream) of a route that carries its job."""
        for attempt in itertools.count():
            if self.stopping.is_set() and job.job_id is None:
                return
            try:
                with http.stream("POST", f"{self._url(job, attempt)}{path}", json=body) as r:
                    job.job_id = r.headers.get(JOB_HEADER) or job.job_id
                    if job.job_id and job.accepted_at is None:
                        job.accepted_at = time.monotonic()
                    if r.status_code != 200:
                        r.read()
                        if job.job_id is None and r.status_code in NOT_ACCEPTED:
                            job.retries += 1
                            time.sleep(0.2)
                            continue
                        job.error(*api_error(r))
                        return
                    if not stream:
                        r.read()
                        answer = r.json()
                        job.finals += 1
                        job.text = (
                            answer["response"]
                            if "response" in answer
                            else answer["choices"][0]["message"]["content"]
                        )
                        job.end("done")
                    elif path == "/stream":
                        self._read_chunks(r, job)
                    else:
                        self._read_openai(r, job)
                    return
            except httpx.ConnectError:
                job.retries += 1
                time.sleep(0.2)
            except httpx.HTTPError as exc:  # cut after it went out: the job may run on
                job.unsure += job.job_id is None
                job.end("interrupted", f"{type(exc).__name__}: {exc}"[:200])
                return

    def _openai_stream(self, http: httpx.Client, job: Job, rng: random.Random) -> None:
        self._carried(http, job, "/v1/chat/completions", self._openai_body(job, True), True)

    def _openai(self, http: httpx.Client, job: Job, rng: random.Random) -> None:
        self._carried(http, job, "/v1/chat/completions", self._openai_body(job, False), False)

    def _seed_stream(self, http: httpx.Client, job: Job, rng: random.Random) -> None:
        self._carried(http, job, "/stream", seed_body("chaos", job.size), True)

    def _seed(self, http: httpx.Client, job: Job, rng: random.Random) -> None:
        self._carried(http, job, "/", seed_body("chaos", job.size), False)

    def _read_openai(self, r: httpx.Response, job: Job) -> None:
        for line in sse_lines(r.iter_text()):
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                job.finals += 1
                job.end("done")
                return
            chunk = json.loads(line[6:])
            if "error" in chunk:
                job.finals += 1
                job.error(chunk["error"].get("type"), chunk["error"].get("message"))
                return
            for choice in chunk.get("choices", []):
                if content := (choice.get("delta") or {}).get("content"):
                    job.text += content
                    job.delta_times.append(time.monotonic())
        job.end("interrupted", "the stream ended without [DONE]")

    def _read_chunks(self, r: httpx.Response, job: Job) -> None:
        """``<^>`` + the whole answer so far, again and again: each must extend the one before."""
        body, complete = "", False
        try:
            for text in r.iter_text():
                body += text
            complete = True
        finally:  # on a cut, the last piece may be partial: only whole ones count
            pieces = body.split(MARKER)[1:]
            whole = pieces if complete else pieces[:-1]
            answers = [p for p in whole if not p.startswith("{")]
            for before, after in itertools.pairwise(answers):
                if not after.startswith(before) and not job.disorder:
                    job.disorder = f"chunk {after[-40:]!r} does not extend {before[-40:]!r}"
            job.text = answers[-1] if answers else ""
        job.finals += 1
        if pieces and pieces[-1].startswith("{"):
            error = json.loads(pieces[-1]).get("error", {})
            job.error(error.get("type"), error.get("message"))
        else:
            job.end("done")
