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
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import pytest

from shared import keys
from streamq.processes import Service, start_front, start_synthetic_worker, wait_for, wait_workers
from streamq.redis_sentinel import SentinelRedis
from tests.sse import follow, read_events, text_of

pytestmark = pytest.mark.e2e

TOKENS = 60  # per job: 1.5 s at 40 tokens/s, so jobs are mid-stream when the primary dies
FINAL = ("done", "error", "canceled")


@dataclass
class HaStack:
    ha: SentinelRedis
    urls: list[str]
    services: list[Service]


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


def _load_through(ha_stack: HaStack, fail: Callable[[], object]) -> tuple[list[Client], float, str]:
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


def _audit(ha_stack: HaStack, clients: list[Client], reference: str) -> None:
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
            view = _answered(partial(client.get, f"{urls[0]}/v1/jobs/{c.job_id}")).json()
            assert view.get("status") in ("finished", "failed"), (c.index, c.final, c.resumes, view)
            if c.final == "done":
                assert "".join(c.deltas) == view["text"] == reference, (c.index, c.resumes, c.deltas, view)
            else:
                assert c.error is not None and c.error["message"], c.error
            assert len(c.event_ids) == len(set(c.event_ids)), "an event was delivered twice"
        assert sum(c.final == "done" for c in clients) >= len(clients) - 2
        for url in urls:
            job = _answered(partial(client.post, f"{url}/v1/jobs", json={"prompt": "after", "max_tokens": 5}))
            assert job.status_code == 202, job.text
            assert follow(client, url, job.json()["id"])[-1].event == "done"
    assert all(s.alive() for s in ha_stack.services)


def _answered(call: Callable[[], httpx.Response], within: float = 15) -> httpx.Response:
    """``call()``, again after its Retry-After while it is a 503 (the old primary, back as a
    replica, is still loading; a sentinel has not caught up), as a client does."""
    deadline = time.monotonic() + within
    while (r := call()).status_code == 503 and time.monotonic() < deadline:
        time.sleep(float(r.headers.get("Retry-After", "1")))
    return r


def _first_tokens_after(clients: list[Client], began: float) -> list[float]:
    """Seconds from ``began`` to each running stream's first token after it."""
    after = [[t for t in c.delta_times if t > began] for c in clients[:12]]
    return [min(times) - began for times in after if times]


def test_a_primary_killed_mid_load_loses_no_accepted_job(ha_stack: HaStack) -> None:
    promoted: list[tuple[int, int, float]] = []
    clients, killed_at, reference = _load_through(ha_stack, lambda: promoted.append(ha_stack.ha.fail_over()))
    _audit(ha_stack, clients, reference)
    waits = _first_tokens_after(clients, killed_at)
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
            job = _answered(partial(client.post, f"{url}/v1/jobs", json=busy)).json()
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
    clients, began, reference = _load_through(ha_stack, lambda: ha_stack.ha.lose_last_writes(0.6))
    _audit(ha_stack, clients, reference)
    logs = "".join(s.log() for s in ha_stack.services)
    assert "Redis lost this run's last output" in logs  # the lossy path ran, and was survived
    waits = _first_tokens_after(clients, began)
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
    clients, began, reference = _load_through(ha_stack, failover)
    _audit(ha_stack, clients, reference)
    logs = "".join(s.log()[n:] for s, n in zip(ha_stack.services, before, strict=True))
    assert "removed dead worker" not in logs
    waits = _first_tokens_after(clients, began)
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
        busy = [] if slots_free else [_answered(long_job).json()["id"] for _ in range(8)]  # 2 × 4 slots

        def all_running() -> bool:
            return all(client.get(f"{url}/v1/jobs/{j}").json()["status"] == "running" for j in busy)

        wait_for(all_running, 30, "every slot busy")
        primary = ha.client()

        def with_status(*statuses: str) -> set[str]:
            return {k for k in primary.scan_iter(keys.job("*")) if primary.hget(k, "status") in statuses}

        canceled_before = with_status("canceled")
        replica = ha.replica_port()
        ha.kill(replica)
        try:
            began = time.monotonic()
            body = {"prompt": "unreplicated", "max_tokens": 4000 if slots_free else 5}
            refused = client.post(f"{url}/v1/jobs", json=body)
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"].isdigit()
            assert "replica" in refused.json()["error"]["message"]
            assert time.monotonic() - began < 5
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
        job = _answered(
            partial(client.post, f"{url}/v1/jobs", json={"prompt": "replicated", "max_tokens": 5})
        )
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

            def answered() -> str:
                body = {"model": model, "prompt": "rq", "max_tokens": 5}
                job = _answered(partial(client.post, f"{url}/v1/jobs", json=body), within=30)
                assert job.status_code == 202, job.text
                return follow(client, url, job.json()["id"])[-1].event

            def within(seconds: float) -> str | None:  # a job no worker takes waits forever
                ended: list[str] = []
                runner = threading.Thread(target=lambda: ended.append(answered()), daemon=True)
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
