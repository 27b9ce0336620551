"""The chaos soak's audit (bench/chaos.py): every accepted job, read through the job API and in
Redis once the load has stopped, against what its client saw and the clean runs."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.chaos_load import Job
from bench.chaos_stack import Stack
from shared import keys
from shared.job_store.vocabulary import FINAL_EVENTS, FINAL_STATUSES

DRAIN_WAIT = 60.0  # after the load stops, then again in the audit: the longest wait for the jobs' ends
NOT_FOUND = "not found (404)"
Views = dict[str, dict[str, Any]]  # job id → GET /v1/jobs/{id}
Streams = dict[str, tuple[int, str] | None]  # job id → its Redis stream's final events and text
REFUSED = re.compile(r"job ([0-9a-f]{32}): .*canceled and refused")


def family(kind: str) -> str:
    return "seed" if kind.startswith("seed") else "jobs"


@dataclass
class Audit:
    views: dict[str, dict[str, Any]] = field(default_factory=dict)
    orphans: set[str] = field(default_factory=set)  # jobs in Redis that no client learned of
    refused: Counter[str] = field(default_factory=Counter)  # made, then canceled and refused (503): statuses
    expired: int = 0  # gone, but the client saw them end longer ago than the result TTL
    lost: list[str] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    interrupted: Counter[str] = field(default_factory=Counter)
    canceled: Counter[str] = field(default_factory=Counter)
    disorder: list[str] = field(default_factory=list)  # a client's stream with a gap or a repeat
    finals: list[str] = field(default_factory=list)  # a Redis stream without exactly one final event
    mismatch: list[str] = field(default_factory=list)  # finished, not the clean run's text
    problems: list[str] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)  # refused (503), yet finished
    last_finished: float = 0.0


def _reason(error: dict[str, Any] | None) -> str:
    if not error:
        return "(no error recorded)"
    message = re.sub(r"\d+(\.\d+)?", "N", re.sub(r"[0-9a-f]{32}", "<id>", str(error.get("message"))))
    return f"{error.get('type')}: {message}"[:100]


def _final_views(stack: Stack, ids: set[str], wait: float) -> tuple[Views, Streams]:
    """Every job's view, again for those not yet final until all are or ``wait`` has passed; and
    each final one's Redis stream, read as soon as it is final (before its result TTL ends)."""
    views: Views = {}
    streams: Streams = {}
    deadline = time.monotonic() + wait
    pending = set(ids)
    with httpx.Client(timeout=10) as http:
        while pending:
            for job_id in sorted(pending):
                for url in stack.urls:
                    try:
                        r = http.get(f"{url}/v1/jobs/{job_id}")
                    except httpx.HTTPError:
                        continue
                    if r.status_code in (200, 404):
                        views[job_id] = r.json() if r.status_code == 200 else {"status": NOT_FOUND}
                        break
            final = {j for j in pending if views.get(j, {}).get("status") in FINAL_STATUSES}
            streams |= _redis_streams(stack, final)
            pending -= final
            if time.monotonic() > deadline:
                break
            time.sleep(1)
    return views, streams


def _redis_streams(stack: Stack, ids: set[str]) -> Streams:
    """Each job's Redis stream: (final events, the deltas' text); None once its keys are gone."""
    r = stack.ha.client()
    ordered = sorted(ids)
    out: Streams = {}
    for start in range(0, len(ordered), 200):
        pipe = r.pipeline(transaction=False)
        for job_id in ordered[start : start + 200]:
            pipe.exists(keys.job(job_id))
            pipe.xrange(keys.events(job_id))
        replies = pipe.execute()
        for job_id, there, entries in zip(
            ordered[start : start + 200], replies[::2], replies[1::2], strict=True
        ):
            finals = sum(fields["event"] in FINAL_EVENTS for _, fields in entries)
            text = "".join(json.loads(f["data"]).get("text", "") for _, f in entries if f["event"] == "delta")
            out[job_id] = (finals, text) if there else None
    return out


def audit_jobs(
    stack: Stack, jobs: list[Job], reference: dict[tuple[str, int], str], clean: set[str]
) -> Audit:
    audit = Audit()
    known = {j.job_id for j in jobs if j.job_id}
    stored = {
        k.split("{", 1)[1].rstrip("}") for k in stack.ha.client().scan_iter("streamq:job:*", count=1000)
    }
    # A submit whose job the replica did not get in time is canceled and answered 503 (the client
    # sends it again): the front logs it.
    refused = {m[1] for line in stack.log_lines("refused") if (m := REFUSED.search(line))}
    audit.orphans = stored - known - clean - refused
    audit.views, streams = _final_views(stack, known | audit.orphans | refused, DRAIN_WAIT)
    audit.refused = Counter(audit.views.get(j, {}).get("status", "no answer") for j in refused)
    for job_id in sorted(refused):
        view = audit.views.get(job_id, {})
        if view.get("status") == "finished":
            tokens, took = view["usage"]["completion_tokens"], view["finished_at"] - view["created_at"]
            audit.ran.append(f"{job_id}: {tokens} tokens, finished {took:.2f} s after it was made")
    by_id = {j.job_id: j for j in jobs if j.job_id}

    def who(job_id: str) -> str:
        job = by_id.get(job_id)
        seen = (
            "unknown to its client"
            if job is None
            else (
                f"{job.kind} (max {job.size}): the client saw {job.outcome} {job.detail!r}, "
                f"{len(job.text)} chars, {job.resumes} resumes"
            )
        )
        view = audit.views.get(job_id, {})
        api = {k: view.get(k) for k in ("status", "error", "worker", "finish_reason", "usage")}
        return f"{job_id} {seen}; the job API: {api}, {len(view.get('text', ''))} chars"

    for job_id in sorted(known | audit.orphans):
        view = audit.views.get(job_id, {"status": "no answer"})
        status = view["status"]
        job = by_id.get(job_id)
        ended = job.ended_at if job and job.outcome else None
        if status == NOT_FOUND and ended is not None and ended < time.monotonic() - stack.result_ttl:
            audit.expired += 1  # its result TTL passed before the audit came to it
            continue
        if status not in FINAL_STATUSES:
            audit.lost.append(who(job_id))
            continue
        audit.last_finished = max(audit.last_finished, view.get("finished_at") or 0.0)
        stream = streams.get(job_id)
        if stream is None:
            audit.expired += 1  # its keys' result TTL passed before its stream was read
        elif stream[0] != 1 or stream[1] != view["text"]:
            audit.finals.append(
                f"{who(job_id)}; its Redis stream: {stream[0]} final events, {len(stream[1])} chars"
            )
        if status == "failed":
            audit.errors[_reason(view.get("error"))] += 1
        if status == "canceled":
            audit.canceled["asked" if job and job.cancel_asked else "not asked"] += 1
        if status == "finished" and job is not None and view["text"] != reference[family(job.kind), job.size]:
            audit.mismatch.append(who(job_id))
    for job in jobs:
        audit.problems += [f"{job.kind} {job.job_id}: {p}" for p in job.problems]
        if job.outcome == "interrupted":
            audit.interrupted[f"{job.kind}: {job.detail.split(':')[0]}"] += 1
        view = audit.views.get(job.job_id or "", {})
        if job.job_id is None or view.get("status") not in FINAL_STATUSES:
            continue
        # The whole text when the client read the job to its end; a prefix of it when cut off (or
        # when a waiting route answered with an error, and no text).
        whole = job.outcome in ("done", "finished", "failed", "canceled") or (
            job.outcome == "error" and job.kind in ("sse", "openai-stream", "seed-stream") and job.finals
        )
        if job.disorder:
            audit.disorder.append(f"{who(job.job_id)}: {job.disorder}")
        elif (whole and job.text != view["text"]) or not view["text"].startswith(job.text):
            audit.disorder.append(f"{who(job.job_id)}: the client's text is not the stored text")
        elif job.outcome == "done" and view["status"] != "finished":
            audit.problems.append(f"{who(job.job_id)}: the client saw it done")
    return audit
