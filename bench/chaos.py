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

Stack: a Sentinel-managed Redis (primary, replica, 3 sentinels), 2 fronts, 2 synthetic workers
(bench/chaos_stack.py, with the chaos). The audit is in bench/chaos_audit.py, Redis's keys before
and after in bench/chaos_redis_keys.py, the table in bench/chaos_report.py.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from pathlib import Path

from bench.chaos_audit import DRAIN_WAIT, audit_jobs
from bench.chaos_load import CLIENTS, Load, clean_runs
from bench.chaos_redis_keys import redis_reading, wait_baseline
from bench.chaos_report import print_table
from bench.chaos_stack import Chaos, Stack


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
