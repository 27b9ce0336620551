"""Redis failing over under load, as operators meet it, on a Sentinel-managed Redis: a primary,
a replica and three sentinels on loopback (real redis-server processes), two fronts and two
synthetic workers that find the primary through the sentinels. The primary is SIGKILLed
mid-load; or cut off from its replica first, so that the failover loses its last writes; or the
replica is down when a job is submitted.

What a client must see: a job that got a 202 ends (finished, or a clear error), never stays
queued or running; its stream, resumed with Last-Event-ID when it breaks, has no gap and no
repeat; a job no replica got is refused, not promised; new jobs work, with no restart."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from harness.redis_sentinel import SentinelRedis
from harness.services import Service, start_front, start_synthetic_worker, wait_for, wait_workers
from shared import keys
from tests.failover_load import HaStack, answered, audit, first_tokens_after, load_through
from tests.sse import follow

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def ha_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaStack]:
    ha = SentinelRedis()
    logdir = tmp_path_factory.mktemp("failover-logs")
    env = {
        **ha.env(),
        "STREAMQ_PING_INTERVAL": "0.5",
        "STREAMQ_DRAIN_SECONDS": "0",
        "STREAMQ_LEASE_SECONDS": "3",
        "STREAMQ_KEY_RATE_LIMIT": "",
    }
    services: list[Service] = []
    try:
        for i in range(2):
            worker = start_synthetic_worker(env, logdir, "synth", f"ha-w{i}", tokens_per_second=40, slots=4)
            services.append(worker)
        urls = []
        for i in range(2):
            front, url = start_front(env, logdir, f"ha-front-{i}")
            services.append(front)
            urls.append(url)
        wait_workers(urls[0], 2)
        yield HaStack(ha, urls, services)
    finally:
        for service in services:
            service.stop()
        ha.close()


def test_a_primary_killed_mid_load_loses_no_accepted_job(ha_stack: HaStack) -> None:
    promoted: list[tuple[int, int, float]] = []
    clients, killed_at, reference = load_through(ha_stack, lambda: promoted.append(ha_stack.ha.fail_over()))
    audit(ha_stack, clients, reference)
    waits = first_tokens_after(clients, killed_at)
    assert waits
    old, new, promoted_in = promoted[0]
    print(
        f"\nfailover: primary {old} -> {new}, promoted in {promoted_in:.2f} s; first token after it: "
        f"median {statistics.median(waits):.2f} s, max {max(waits):.2f} s; "
        f"resumes {sum(c.resumes for c in clients)}, refused submits {sum(c.refused for c in clients)}"
    )


def _readers_on_replica(ha_stack: HaStack) -> bool:
    clients = ha_stack.ha.client(ha_stack.ha.replica_port()).client_list()
    return sum(c["name"] == "streamq-front" and c["cmd"] == "xread" for c in clients) == 2


def _readers_to_replica(ha_stack: HaStack) -> None:
    """Keep each front's stream reader busy (a long job followed through it) until it reads from
    the replica: within its reconnect period once Sentinel sees the replica in sync again after
    the failover of the test before."""
    with httpx.Client(timeout=httpx.Timeout(30, read=60)) as client:
        jobs = []
        for url in ha_stack.urls:
            busy = {"prompt": "busy", "max_tokens": 4000}
            job = answered(partial(client.post, f"{url}/v1/jobs", json=busy)).json()
            reader = threading.Thread(
                target=follow, args=(httpx.Client(timeout=60), url, job["id"]), daemon=True
            )
            reader.start()
            jobs.append(job["id"])
        try:
            wait_for(lambda: _readers_on_replica(ha_stack), 45, "the fronts' stream readers on the replica")
        finally:
            for job_id in jobs:
                client.post(f"{ha_stack.urls[0]}/v1/jobs/{job_id}/cancel")


def test_a_failover_that_loses_writes_loses_no_accepted_job_and_no_text(ha_stack: HaStack) -> None:
    """The replica cut off for 0.6 s while the primary takes writes, then promoted without them: a
    run's output written meanwhile is gone. No client saw it (fronts read streams from a replica in
    sync), no job accepted meanwhile got a 202 (no replica had it), and the runs that lost output
    hand their jobs back, to be continued from what the new primary has."""

    _readers_to_replica(ha_stack)
    clients, began, reference = load_through(ha_stack, lambda: ha_stack.ha.lose_last_writes(0.6))
    audit(ha_stack, clients, reference)
    logs = "".join(s.log() for s in ha_stack.services)
    assert "Redis lost this run's last output" in logs  # the lossy path ran, and was survived
    waits = first_tokens_after(clients, began)
    print(
        f"\nlossy failover: first token after it: median {statistics.median(waits):.2f} s, max "
        f"{max(waits):.2f} s; resumes {sum(c.resumes for c in clients)}, refused submits "
        f"{sum(c.refused for c in clients)}, handbacks {logs.count('lost this run')}"
    )


def test_a_failover_sentinel_is_told_to_make_loses_no_accepted_job_nor_a_live_worker(
    ha_stack: HaStack,
) -> None:
    """``SENTINEL FAILOVER`` leaves the old primary up and writable for seconds: processes that
    went on with it lost jobs they had answered 202 (taken there by a worker as well), and
    beat there, so that the new primary's janitor took live workers for dead and ran their jobs
    again. Each pool asks the sentinels at most once a second while it is used, and leaves it."""
    _readers_to_replica(ha_stack)  # as after the test before: a stream read off the primary could
    # show output a failover loses (the fronts read from a replica in sync, where there is one)
    promoted: list[tuple[int, int, float]] = []
    before = [len(s.log()) for s in ha_stack.services]
    failover = lambda: promoted.append(ha_stack.ha.commanded_failover())  # noqa: E731
    clients, began, reference = load_through(ha_stack, failover)
    audit(ha_stack, clients, reference)
    logs = "".join(s.log()[n:] for s, n in zip(ha_stack.services, before, strict=True))
    assert "removed dead worker" not in logs
    waits = first_tokens_after(clients, began)
    print(
        f"\ncommanded failover: promoted in {promoted[0][2]:.2f} s; first token after it: median "
        f"{statistics.median(waits):.2f} s, max {max(waits):.2f} s; resumes "
        f"{sum(c.resumes for c in clients)}, refused submits {sum(c.refused for c in clients)}"
    )


@pytest.mark.parametrize("slots_free", [False, True])
def test_a_job_no_replica_got_is_refused_not_promised(ha_stack: HaStack, slots_free: bool) -> None:
    """With the replica down, a failover would lose a new job: the front WAITs for one replica
    before its 202, and without it answers 503 (Retry-After) and cancels the job it wrote; with
    a slot free, a worker takes it during the wait, and it is stopped too (it was accepted: its
    primary may be one the sentinels have replaced, where job and run vanish after the 202)."""
    ha, url = ha_stack.ha, ha_stack.urls[0]
    with httpx.Client(timeout=30) as client:
        long_job = partial(client.post, f"{url}/v1/jobs", json={"prompt": "busy", "max_tokens": 4000})
        busy = [] if slots_free else [answered(long_job).json()["id"] for _ in range(8)]  # 2 × 4 slots

        def all_running() -> bool:
            return all(client.get(f"{url}/v1/jobs/{j}").json()["status"] == "running" for j in busy)

        wait_for(all_running, 30, "every slot busy")
        primary = ha.client()

        def with_status(*statuses: str) -> set[str]:
            return {k for k in primary.scan_iter(keys.job("*")) if primary.hget(k, "status") in statuses}

        canceled_before = with_status("canceled")

        def unreplicated() -> float:
            found = re.search(
                r"^streamq_jobs_unreplicated_total (\S+)$", client.get(f"{url}/metrics").text, re.M
            )
            assert found is not None
            return float(found[1])

        refused_before = unreplicated()
        replica = ha.replica_port()
        ha.kill(replica)
        try:
            began = time.monotonic()
            body = {"prompt": "unreplicated", "max_tokens": 4000 if slots_free else 5}
            refused = client.post(f"{url}/v1/jobs", json=body)
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"].isdigit()
            error = refused.json()["error"]
            assert "replica" in error["message"] and error["code"] == "replica_unavailable", error
            assert time.monotonic() - began < 5
            assert unreplicated() == refused_before + 1
            # What it wrote is canceled (stopped, if a worker took it): nothing is left to run, or
            # to count against the key.
            wait_for(lambda: not with_status("queued", "running") - set(map(keys.job, busy)), 10, "a stop")
            assert primary.llen(keys.rq_queue("synth")) == 0
            assert len(with_status("canceled") - canceled_before) == 1  # the refused one
        finally:
            for job_id in busy:
                client.post(f"{url}/v1/jobs/{job_id}/cancel")
            ha.rejoin(replica, ha.primary_port())
    with httpx.Client(timeout=30) as client:
        job = answered(partial(client.post, f"{url}/v1/jobs", json={"prompt": "replicated", "max_tokens": 5}))
        assert job.status_code == 202, job.text
        assert follow(client, url, job.json()["id"])[-1].event == "done"


def test_a_worker_run_the_rq_way_finds_the_new_primary(ha_stack: HaStack, tmp_path: Path) -> None:
    """``rq worker -w worker.rq_worker.StreamqWorker -c worker.rq_config`` (the README's command)
    asks the sentinels for the primary. RQ's loop ends at a Redis error outside its wait for a
    job (its rule), so it runs under a supervisor that starts it again: started again, it serves
    from the new primary. (With ``-u`` and the primary's address, as the README said, it went
    back to the old primary, a replica by then, and the model had no live worker.)"""
    model = "synth-rq"
    env = {**os.environ, **ha_stack.ha.env(), "STREAMQ_BACKEND": "synthetic", "STREAMQ_SERVED_NAME": model}
    command = [str(Path(sys.executable).with_name("rq")), "worker", "-w", "worker.rq_worker.StreamqWorker"]
    command += ["-c", "worker.rq_config"]
    log = tmp_path / "rq-worker.log"

    def started() -> subprocess.Popen[bytes]:  # as a supervisor (re)starts it: RQ's default name
        # is new each time; a fixed ``-n`` is refused while RQ still holds the record of the run
        # that quit (RQ's rule: it could not mark its death on the primary that had just died)
        name = ["-n", f"ha-rq-{len(workers)}"]
        with open(log, "ab") as out:
            return subprocess.Popen(
                command + name, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=out
            )

    url = ha_stack.urls[0]
    workers: list[subprocess.Popen[bytes]] = []
    workers.append(started())
    try:
        with httpx.Client(timeout=30) as client:

            def one_job() -> str:
                body = {"model": model, "prompt": "rq", "max_tokens": 5}
                job = answered(partial(client.post, f"{url}/v1/jobs", json=body), within=30)
                assert job.status_code == 202, job.text
                return follow(client, url, job.json()["id"])[-1].event

            def within(seconds: float) -> str | None:  # a job no worker takes waits forever
                ended: list[str] = []
                runner = threading.Thread(target=lambda: ended.append(one_job()), daemon=True)
                runner.start()
                runner.join(seconds)
                return ended[0] if ended else None

            wait_for(lambda: model in client.get(f"{url}/readyz").json()["models"], 60, "the RQ worker")
            assert within(60) == "done"
            ha_stack.ha.fail_over()
            time.sleep(3)  # RQ's loop meets the failover (its wait for a job, or its heartbeat)
            if workers[-1].poll() is not None:
                workers.append(started())
            assert within(60) == "done", log.read_text(errors="replace")
    finally:
        for worker in workers:
            worker.terminate()
            worker.wait(timeout=30)
