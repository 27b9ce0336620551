"""Redis lost under load, as operators meet it: a Sentinel-managed primary SIGKILLed mid-load, and a
Redis restarted empty. Real processes: redis-server primary, replica and three sentinels on
loopback, two fronts and two synthetic workers that find the primary through the sentinels.

What a client must see: a job that got a 202 ends (finished, or a clear error), never stays
queued or running; a stream that breaks resumes with Last-Event-ID, with no gap and no repeat;
a job that Redis lost ends its followers with an error; new jobs work, with no restart."""

from __future__ import annotations

import signal
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from shared import keys
from streamq.processes import Service, start_front, start_synthetic_worker, wait_for, wait_workers
from streamq.redis_sentinel import SentinelRedis
from streamq.redis_server import RedisServer
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


def test_a_primary_killed_mid_load_loses_no_accepted_job(ha_stack: HaStack) -> None:
    urls = ha_stack.urls
    with httpx.Client(timeout=30) as client:
        clean = client.post(f"{urls[0]}/v1/jobs", json={"prompt": "clean", "max_tokens": TOKENS})
        assert clean.status_code == 202, clean.text
        reference = text_of(follow(client, urls[0], clean.json()["id"]))
        assert reference

    # Two waves of clients: the first streams when the primary dies, the second submits during
    # the failover (503s, retried, until the new primary takes writes).
    deadline = time.monotonic() + 120
    clients = [Client(urls, i) for i in range(24)]
    threads = [threading.Thread(target=c.run, args=(deadline,), daemon=True) for c in clients]
    for thread in threads[:12]:
        thread.start()
    wait_for(lambda: sum(bool(c.deltas) for c in clients[:12]) >= 8, 30, "streams under way")
    killed_at = time.monotonic()
    old, new, promoted_in = ha_stack.ha.fail_over()
    for thread in threads[12:]:
        thread.start()
    for thread in threads:
        thread.join(max(1.0, deadline - time.monotonic()))

    problems = {c.index: c.problems for c in clients if c.problems}
    assert not problems, problems
    accepted = [c for c in clients if c.job_id is not None]
    assert len(accepted) == len(clients)
    # Every accepted job ended, and the job API agrees; none is left queued or running.
    with httpx.Client(timeout=30) as client:
        for c in accepted:
            assert c.final is not None, (c.index, c.job_id, c.resumes)
            view = client.get(f"{urls[0]}/v1/jobs/{c.job_id}").json()
            assert view["status"] in ("finished", "failed"), view
            if c.final == "done":
                # No gap and no repeat: the deltas read, across resumes, spell the stored answer,
                # and it is the clean run's.
                assert "".join(c.deltas) == view["text"] == reference, (c.index, c.resumes)
            else:
                assert c.error is not None and c.error["message"], c.error
    assert sum(c.final == "done" for c in accepted) >= len(accepted) - 2
    for c in accepted:
        assert len(c.event_ids) == len(set(c.event_ids)), "an event was delivered twice"

    # Time to the first token after the failover, for the streams that were running through it.
    after = [[t for t in c.delta_times if t > killed_at] for c in clients[:12]]
    waits = [min(times) - killed_at for times in after if times]
    assert waits
    print(
        f"\nfailover: primary {old} -> {new}, promoted in {promoted_in:.2f} s; first token after it: "
        f"median {statistics.median(waits):.2f} s, max {max(waits):.2f} s; "
        f"resumes {sum(c.resumes for c in clients)}, refused submits {sum(c.refused for c in clients)}"
    )

    # Service after, with no restart: a new job through each front.
    with httpx.Client(timeout=30) as client:
        for url in urls:
            job = client.post(f"{url}/v1/jobs", json={"prompt": "after", "max_tokens": 5})
            assert job.status_code == 202, job.text
            assert follow(client, url, job.json()["id"])[-1].event == "done"
    assert all(s.alive() for s in ha_stack.services)


# ----- a Redis restarted empty -----------------------------------------------------------------


@dataclass
class EmptyStack:
    redis: RedisServer
    url: str
    front: Service
    worker: Service


@pytest.fixture(scope="module")
def empty_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmptyStack]:
    server = RedisServer()
    logdir = tmp_path_factory.mktemp("empty-logs")
    env = {
        "STREAMQ_REDIS_URL": server.url,
        "STREAMQ_PING_INTERVAL": "0.5",
        "STREAMQ_DRAIN_SECONDS": "0",
        "STREAMQ_REDIS_EPOCH_INTERVAL": "0.5",
    }
    worker = start_synthetic_worker(env, logdir, "synth", "empty-w", tokens_per_second=10, slots=1)
    services = [worker]
    try:
        front, url = start_front(env, logdir, "empty-front")
        services.append(front)
        wait_workers(url, 1)
        yield EmptyStack(server, url, front, worker)
    finally:
        for service in services:
            service.stop()
        server.close()


def test_a_redis_restarted_empty_is_noticed_and_no_client_waits_forever(empty_stack: EmptyStack) -> None:
    url = empty_stack.url
    with httpx.Client(timeout=30) as client:
        running = client.post(f"{url}/v1/jobs", json={"prompt": "long", "max_tokens": 400}).json()
        queued = client.post(f"{url}/v1/jobs", json={"prompt": "waits", "max_tokens": 5}).json()
        wait_for(
            lambda: client.get(f"{url}/v1/jobs/{running['id']}").json()["status"] == "running", 30, "a run"
        )

        empty_stack.redis.stop()
        empty_stack.redis.start()  # keeps nothing on disk: back empty

        # Each follower ends: at once with a final error, or (its stream cut with the connection)
        # on its resume, which finds no job; never an endless stream.
        for job in (running, queued):
            began = time.monotonic()
            ended = None
            while time.monotonic() - began < 20 and ended is None:
                try:
                    with client.stream("GET", f"{url}/v1/jobs/{job['id']}/events") as r:
                        if r.status_code == 404:
                            ended = "not_found"
                            r.read()
                            assert r.json()["error"]["message"]
                        elif r.status_code == 200:
                            for event in read_events(r):
                                if event is not None and event.event in FINAL:
                                    assert event.event == "error" and event.data["type"] == "job_lost"
                                    ended = "job_lost"
                                    break
                        else:
                            r.read()
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            assert ended is not None, f"the follower of {job['id']} did not end"

        # Every process noticed, and says so: the front's metric, the worker's log.
        wait_for(
            lambda: "streamq_redis_data_lost_total 1.0" in client.get(f"{url}/metrics").text,
            10,
            "the front's data-lost metric",
        )
        wait_for(lambda: "Redis lost its data" in empty_stack.worker.log(), 10, "the worker's log line")
        assert "Redis lost its data" in empty_stack.front.log()

        # New jobs work, on the same processes.
        job = client.post(f"{url}/v1/jobs", json={"prompt": "after", "max_tokens": 5})
        assert job.status_code == 202, job.text
        assert follow(client, url, job.json()["id"])[-1].event == "done"
    assert empty_stack.front.alive() and empty_stack.worker.alive()


def test_a_follower_of_a_job_that_vanished_gets_a_final_error(empty_stack: EmptyStack) -> None:
    """The job's keys gone while its stream stays open (a failover to a replica that lacked them,
    an operator's mistake): the follower's next keep-alive finds no job and ends it with an error."""
    url = empty_stack.url
    wait_workers(url, 1)
    with httpx.Client(timeout=httpx.Timeout(30, read=10)) as client:
        submitted = client.post(f"{url}/v1/jobs", json={"prompt": "long", "max_tokens": 400})
        assert submitted.status_code == 202, submitted.text
        job = submitted.json()
        with client.stream("GET", f"{url}/v1/jobs/{job['id']}/events") as r:
            events = read_events(r)
            while (event := next(events)) is None or event.event != "delta":
                pass
            # Only this job's keys: Redis's epoch stays, so the keep-alive's check must find it.
            store = empty_stack.redis.client()
            store.delete(*(k(job["id"]) for k in (keys.job, keys.events, keys.text, keys.tokens, keys.lease)))
            began = time.monotonic()
            final = next(e for e in events if e is not None and e.event in FINAL)
        assert final.event == "error" and final.data["type"] == "job_lost", final
        assert "submit" in final.data["message"]
        assert time.monotonic() - began < 5


def test_a_job_no_replica_got_is_refused_not_promised(ha_stack: HaStack) -> None:
    """With the replica down, a failover would lose a new job: the front WAITs for one replica
    before its 202, and without it answers 503 (Retry-After) and cancels the job it wrote."""
    ha, url = ha_stack.ha, ha_stack.urls[0]
    replica = ha.replica_port()
    ha.kill(replica)
    try:
        with httpx.Client(timeout=30) as client:
            began = time.monotonic()
            refused = client.post(f"{url}/v1/jobs", json={"prompt": "unreplicated", "max_tokens": 5})
            assert refused.status_code == 503, refused.text
            assert refused.headers["Retry-After"].isdigit()
            assert "replica" in refused.json()["error"]["message"]
            assert time.monotonic() - began < 5
            # Nothing it wrote is left to run or to count against the caller.
            primary = ha.client()
            statuses = {primary.hget(k, "status") for k in primary.scan_iter(keys.job("*"))}
            assert "queued" not in statuses and "running" not in statuses, statuses
            assert "canceled" in statuses  # the refused one (the jobs before it all finished)
    finally:
        ha.start_node(replica, replica_of=ha.primary_port())
    wait_for(lambda: ha.client(replica).info("replication")["master_link_status"] == "up", 30, "a replica")
    with httpx.Client(timeout=30) as client:
        job = client.post(f"{url}/v1/jobs", json={"prompt": "replicated", "max_tokens": 5})
        assert job.status_code == 202, job.text
        assert follow(client, url, job.json()["id"])[-1].event == "done"


def test_with_no_worker_alive_the_fronts_janitor_requeues_a_dead_workers_job(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The janitor runs in fronts too: a job whose only worker was SIGKILLed goes back to its queue
    with no worker alive, and the next worker to come continues it, whole."""
    server = RedisServer()
    logdir = tmp_path_factory.mktemp("janitor-logs")
    env = {"STREAMQ_REDIS_URL": server.url, "STREAMQ_LEASE_SECONDS": "2", "STREAMQ_DRAIN_SECONDS": "0"}
    services: list[Service] = []
    try:
        first = start_synthetic_worker(env, logdir, "synth", "lone-a", tokens_per_second=20)
        services.append(first)
        front, url = start_front(env, logdir, "janitor-front")
        services.append(front)
        wait_workers(url, 1)
        with httpx.Client(timeout=30) as client:
            clean = client.post(f"{url}/v1/jobs", json={"prompt": "clean", "max_tokens": 40}).json()
            reference = text_of(follow(client, url, clean["id"]))
            job = client.post(f"{url}/v1/jobs", json={"prompt": "orphan", "max_tokens": 40}).json()
            status = f"{url}/v1/jobs/{job['id']}"
            wait_for(lambda: client.get(status).json()["usage"]["completion_tokens"] >= 5, 30, "tokens")
            first.stop(signal.SIGKILL)
            wait_for(lambda: client.get(status).json()["status"] == "queued", 20, "the front's janitor")
            assert not first.alive() and f"job {job['id']} lost its worker" in front.log()
            services.append(start_synthetic_worker(env, logdir, "synth", "lone-b", tokens_per_second=20))
            events = follow(client, url, job["id"])
            assert events[-1].event == "done"
            assert client.get(status).json()["text"] == reference
    finally:
        for service in services:
            service.stop()
        server.close()
