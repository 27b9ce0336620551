"""The chaos soak's table (bench/chaos.py): what ran, what the audit found, and the evidence of
each failed check from the processes' logs."""

from __future__ import annotations

import os
import platform
import re
import statistics
import sys
from collections import Counter

from bench.chaos_audit import Audit
from bench.chaos_load import KINDS, SIZES, Job, Load, clean_text
from bench.chaos_redis_keys import Reading
from bench.chaos_stack import (
    CHAOS_EVERY,
    DOWN_AFTER_MS,
    FRONTS,
    SLOTS,
    TOKENS_PER_SECOND,
    WORKERS,
    Chaos,
    Stack,
)


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
