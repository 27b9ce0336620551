"""Chaos soak: for N minutes a steady mixed load (bench/chaos_load.py: job API streams with
resume, polling, cancels, OpenAI streaming and not, the seed's routes) while, every 8-12 s, a
random worker or front is SIGKILLed and restarted, or the Redis primary is SIGKILLed and the
sentinels fail over. Then every accepted job is audited:

* it ended: final status through the job API, and exactly one final event in its Redis stream
  (a 404, or queued/running after the wait, is a lost job);
* a finished job's text is the clean run's for its size (synthetic output is deterministic);
* no gap and no repeat: each stream's deltas, as its client read them, spell the job's stored
  text (a prefix of it for a stream that ended early), with event ids strictly increasing; the
  seed's chunks each extend the last; the Redis stream's own deltas spell the stored text;
* Redis returns to its baseline once the result TTL has passed (what is left is reported).

Stack: a Sentinel-managed Redis (primary, replica, 3 sentinels), 2 fronts, 2 synthetic workers.
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.chaos_load import (
    CHAOS_EVERY,
    CLIENTS,
    DOWN_AFTER_MS,
    FRONTS,
    KINDS,
    SIZES,
    SLOTS,
    TOKENS_PER_SECOND,
    WORKERS,
    Chaos,
    Job,
    Load,
    Stack,
    clean_runs,
    clean_text,
)
from shared import keys
from shared.job_store.vocabulary import FINAL_EVENTS, FINAL_STATUSES
from streamq.redis_sentinel import SentinelRedis

DRAIN_WAIT = 60.0  # after the load stops, then again in the audit: the longest wait for the jobs' ends
NOT_FOUND = "not found (404)"
Views = dict[str, dict[str, Any]]  # job id → GET /v1/jobs/{id}
Streams = dict[str, tuple[int, str] | None]  # job id → its Redis stream's final events and text
REFUSED = re.compile(r"job ([0-9a-f]{32}): .*canceled and refused")


def family(kind: str) -> str:
    return "seed" if kind.startswith("seed") else "jobs"


@dataclass
class Reading:
    keys: int
    memory: int
    patterns: Counter[str]
    ttls: dict[str, int]  # the longest TTL of a pattern's keys (-1: one has none)


def key_pattern(key: str) -> str:
    key = re.sub(r"\{[^}]*\}", "{*}", key)
    key = re.sub(r"[0-9a-f]{16,}", "*", key)
    return re.sub(r"chaos-w\d+", "chaos-w*", key)


def redis_reading(ha: SentinelRedis) -> Reading:
    r = ha.client()
    names = list(r.scan_iter(count=1000))
    pipe = r.pipeline(transaction=False)
    for name in names:
        pipe.ttl(name)
    ttls: dict[str, int] = {}
    for name, ttl in zip(names, pipe.execute(), strict=True):
        pattern = key_pattern(name)
        ttls[pattern] = -1 if -1 in (ttl, ttls.get(pattern)) else max(ttl, ttls.get(pattern, 0))
    found = Counter(key_pattern(k) for k in names)
    return Reading(int(r.dbsize()), int(r.info("memory")["used_memory"]), found, ttls)


JOB_KEYS = ("streamq:job:", "streamq:events:", "streamq:text:", "rq:job:")


def wait_baseline(ha: SentinelRedis, last_finished: float, ttl: int) -> Reading:
    """Until no job's keys are left, or the result TTL plus a margin has passed since the last end."""
    deadline = time.monotonic() + min(ttl + 30, max(0.0, last_finished + ttl + 15 - time.time()))
    while True:
        reading = redis_reading(ha)
        left = sum(n for p, n in reading.patterns.items() if p.startswith(JOB_KEYS))
        if not left or time.monotonic() > deadline:
            return reading
        time.sleep(2)


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


def failover_waits(jobs: list[Job], failovers: list[tuple[float, float]]) -> list[float]:
    """For each stream waiting for tokens at a failover (accepted before it, not ended): the
    kill → its next delta."""
    waits = []
    for at, _ in failovers:
        for job in jobs:
            after = [t for t in job.delta_times if t > at]
            if (
                job.accepted_at is not None
                and job.accepted_at < at < (job.ended_at or float("inf"))
                and after
            ):
                waits.append(after[0] - at)
    return waits


def run_chaos(workdir: Path, minutes: float, clients: int = CLIENTS) -> list[str]:
    """Run the soak and print its table; returns the failed checks (empty: all held)."""
    seed = int(time.time()) % 100_000
    rng = random.Random(seed)
    # Every job must still be there at the audit: the result TTL outlasts the run and both waits.
    stack = Stack(workdir, result_ttl=round(minutes * 60 + 2 * DRAIN_WAIT) + 10)
    chaos = Chaos()
    try:
        stack.start()
        baseline = redis_reading(stack.ha)
        reference = clean_runs(stack.urls[0])
        clean = {k.split("{", 1)[1].rstrip("}") for k in stack.ha.client().scan_iter("streamq:job:*")}
        load = Load(stack.urls, clients, seed)
        began = time.monotonic()
        load.start()
        chaos.run(stack, rng, minutes * 60)
        time.sleep(max(0.0, began + minutes * 60 - time.monotonic()))
        waiting = load.stop(DRAIN_WAIT)
        audit = audit_jobs(stack, load.jobs, reference, clean)
        after = wait_baseline(stack.ha, audit.last_finished, stack.result_ttl)
    finally:
        stack.close()
    print_table(stack, minutes, load, chaos, audit, reference, (baseline, after), seed)
    if waiting:
        print(f"{waiting} client(s) still waiting for their job after {DRAIN_WAIT:.0f} s")
    checks = {"lost": audit.lost, "gap/repeat": audit.disorder, "final events": audit.finals}
    failed = [name for name, items in (checks | {"text": audit.mismatch}).items() if items]
    if failed:  # the bench's workdir goes when it ends: keep the processes' logs for the report
        kept = Path(tempfile.gettempdir()) / f"streamq-chaos-{seed}-logs"
        shutil.copytree(stack.logdir, kept, dirs_exist_ok=True)
        print(f"the processes' logs are kept in {kept}")
    return failed


def evidence(stack: Stack, item: str) -> list[str]:
    """The log lines that name the job (but the access log's), and its last worker's warnings
    and errors (with their tracebacks)."""
    job_id = re.search(r"[0-9a-f]{32}", item)
    lines = (
        [line for line in stack.log_lines(job_id.group()) if "uvicorn.access" not in line] if job_id else []
    )
    if worker := re.search(r"'worker': '([^']+)'", item):
        lines += [line for line in stack.log_lines("", worker[1]) if " INFO " not in line][:25]
    return lines


def print_table(
    stack: Stack,
    minutes: float,
    load: Load,
    chaos: Chaos,
    audit: Audit,
    reference: dict[tuple[str, int], str],
    redis: tuple[Reading, Reading],
    seed: int,
) -> None:
    jobs = [j for j in load.jobs if j.job_id]
    print(
        f"\nchaos soak — {platform.platform()}, {os.cpu_count()} cores\n"
        f"command: {' '.join(['python -m bench', *sys.argv[1:]])}\n"
        f"{WORKERS} synthetic workers ({SLOTS} slots, {TOKENS_PER_SECOND} tokens/s), {FRONTS} fronts, "
        f"Sentinel Redis (primary, replica, 3 sentinels); {load.clients} clients, kinds in turn, "
        f"max_tokens {SIZES};\nan action every {CHAOS_EVERY[0]:.0f}-{CHAOS_EVERY[1]:.0f} s "
        f"(random seed {seed}); Sentinel down-after-milliseconds {DOWN_AFTER_MS}\n"
        f"settings: {' '.join(f'{k}={v!r}' for k, v in stack.settings.items())}"
    )
    print(f"{'measure':<64}{'value':>12}{'target':>8}   verdict")

    def row(name: str, value: object, target: str = "", ok: bool | None = None) -> None:
        verdict = "" if ok is None else ("met" if ok else "MISSED")
        print(f"{name[:63]:<64}{value!s:>12}{target:>8}   {verdict}")

    def counts(name: str, counter: Counter[str]) -> None:
        row(name, sum(counter.values()))
        for key, n in counter.most_common():
            row(f"  {key}", n)

    clean_ok = all(text == clean_text(n) for (_, n), text in reference.items())
    row("clean runs: the synthetic rule's text (job API, seed route)", "yes" if clean_ok else "NO")
    row("minutes of chaos", f"{minutes:g}")
    row("jobs accepted, known to their client", len(jobs))
    kinds = Counter(j.kind for j in jobs)
    for kind in KINDS:  # in their order, zeros too
        row(f"  {kind}", kinds[kind])
    statuses = Counter(audit.views.get(j, {}).get("status", "no answer") for j in audit.orphans)
    counts("jobs accepted, unknown to their client (a reply lost)", statuses)
    counts("jobs made, then canceled and refused 503 (replica WAIT)", audit.refused)
    row("sends not accepted, sent again (no connection, 503, 429)", sum(j.retries for j in load.jobs))
    row("worker kills (SIGKILL, a new worker started)", chaos.worker_kills)
    row("front kills (SIGKILL, restarted on its port)", chaos.front_kills)
    row("Redis failovers (primary SIGKILLed)", len(chaos.failovers))
    switches = Counter(line.split(": ")[0][-5:] for line in stack.sentinel_events("+switch-master"))
    seen = max(switches.values(), default=0)
    row("  primary switches the sentinels made (+switch-master)", seen, "same", seen == len(chaos.failovers))
    promoted = [took for _, took in chaos.failovers]
    if promoted:
        row("  promoted in, median/max (s)", f"{statistics.median(promoted):.2f}/{max(promoted):.2f}")
    lost_data = {line.split(":")[0] for line in stack.log_lines("Redis lost its data")}
    row("processes that saw Redis lose its data (streamq's check)", len(lost_data), "0", not lost_data)
    row("jobs lost (404, or not final after the wait)", len(audit.lost), "0", not audit.lost)
    if audit.expired:
        row("jobs whose keys expired (result TTL) before the audit read them", audit.expired)
    counts("jobs ended with an error (failed)", audit.errors)
    row("jobs canceled: asked / not asked", f"{audit.canceled['asked']} / {audit.canceled['not asked']}")
    counts("requests interrupted (OpenAI, seed routes: the job runs on)", audit.interrupted)
    row(
        "streams with a gap or a repeat, as read by their client",
        len(audit.disorder),
        "0",
        not audit.disorder,
    )
    row("jobs whose Redis stream has ≠ 1 final event or ≠ its text", len(audit.finals), "0", not audit.finals)
    row("finished jobs whose text differs from the clean run", len(audit.mismatch), "0", not audit.mismatch)
    waits = failover_waits(jobs, chaos.failovers)
    ttft = f"{statistics.median(waits):.2f}/{max(waits):.2f}" if waits else "n/a"
    row(f"first token after a failover, median/max (s; {len(waits)} streams)", ttft)
    before, after = redis
    row(f"Redis keys, before / {stack.result_ttl} s after the last job", f"{before.keys} / {after.keys}")
    row("Redis used_memory, before / after (KiB)", f"{before.memory // 1024} / {after.memory // 1024}")
    for pattern in sorted(set(after.patterns) | set(before.patterns)):
        if after.patterns[pattern] != before.patterns[pattern]:
            ttl = after.ttls.get(pattern)
            name = f"  {pattern[:44]}" + (
                "" if ttl is None else f" (TTL {'none' if ttl < 0 else f'{ttl} s'})"
            )
            row(name, f"{before.patterns[pattern]} / {after.patterns[pattern]}")
    row("client problems (unexpected answers)", len(audit.problems))
    row("chaos actions that failed", len(chaos.problems))
    print("chaos:\n  " + "\n  ".join(chaos.actions or ["(none)"]))
    found = {"LOST": audit.lost, "GAP OR REPEAT": audit.disorder, "REDIS STREAM": audit.finals}
    found |= {
        "TEXT MISMATCH": audit.mismatch,
        "client problem": audit.problems,
        "chaos problem": chaos.problems,
        "refused with a 503, yet ran to its end": audit.ran,
    }
    for title, items in found.items():
        for item in items[:5]:
            print(f"{title}: {item}")
            if title.isupper() or title.startswith("refused"):
                print("".join(f"    {line}\n" for line in evidence(stack, item)), end="")
    if audit.lost or audit.finals:
        print("sentinel events (the time is the bench's):")
        for channel in ("+odown", "+switch-master", "+convert-to-slave", "+role-change", "+fix-slave-config"):
            print("".join(f"    {line}\n" for line in stack.sentinel_events(channel)), end="")
    print(
        "notes: the audit reads every job through the job API once the load has stopped, and its Redis\n"
        "       stream; Redis 'before' is the first primary, 'after' the primary now (another process after\n"
        "       a failover); the rows by key pattern are those whose count changed."
    )
