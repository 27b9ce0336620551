"""Redis losing data, as operators meet it: a Redis restarted empty, a job's keys gone under its
followers, a worker dead with no other worker alive, a start that a failover lost. Real
processes: a private redis-server, a front and synthetic workers.

What a client must see: a follower of a job that Redis lost ends with an error (never an endless
stream), new jobs work with no restart, and a job whose worker or start was lost runs again, whole."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from rq import Queue, Worker

from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_for, wait_workers
from shared import keys
from shared.janitor import Janitor
from shared.settings import Settings
from tests.redis_replies import decoded_entries
from tests.sse import follow, read_events, text_of

pytestmark = pytest.mark.e2e

FINAL = ("done", "error", "canceled")


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
        # `rq info` shows the worker and its queue again (it showed no worker until a restart).
        store = empty_stack.redis.client()

        def in_rq_info() -> bool:
            workers = {w.name: w for w in Worker.all(connection=store)}
            return "empty-w" in workers and workers["empty-w"].queue_names() == [keys.queue_name("synth")]

        wait_for(in_rq_info, 10, "the worker in RQ's list of workers")
        assert keys.queue_name("synth") in {q.name for q in Queue.all(connection=store)}

        # New jobs work, on the same processes.
        job = client.post(f"{url}/v1/jobs", json={"prompt": "after", "max_tokens": 5})
        assert job.status_code == 202, job.text
        assert follow(client, url, job.json()["id"])[-1].event == "done"
    assert empty_stack.front.alive() and empty_stack.worker.alive()


def test_a_worker_a_janitor_took_for_dead_enters_rqs_lists_again(empty_stack: EmptyStack) -> None:
    """A worker paused past its TTL (SIGSTOP, a long GC, a frozen VM) is removed by a janitor,
    in streamq's registry and RQ's; when it goes on, its heartbeat finds it gone and it enters
    both again: `rq info` listed no worker for good while it took jobs."""
    store = empty_stack.redis.client()

    def in_rq_info() -> bool:
        workers = {w.name: w for w in Worker.all(connection=store)}
        return "empty-w" in workers and workers["empty-w"].queue_names() == [keys.queue_name("synth")]

    wait_for(in_rq_info, 10, "the worker in RQ's list of workers")
    store.zadd(keys.WORKERS, {"empty-w": 0})  # its last beat long ago, as after a pause
    Janitor(store, Settings()).forget_dead_workers()
    assert not in_rq_info()
    wait_for(in_rq_info, 15, "the worker in RQ's list of workers again")
    assert "dropped from the registry" in empty_stack.worker.log()
    with httpx.Client(timeout=30) as client:
        job = client.post(f"{empty_stack.url}/v1/jobs", json={"prompt": "back", "max_tokens": 3})
        assert job.status_code == 202, job.text
        assert follow(client, empty_stack.url, job.json()["id"])[-1].event == "done"


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


@dataclass
class LoneWorker:
    """A private Redis, a front and one synthetic worker, with a running job of 30 tokens and a
    clean run's text of the same length."""

    redis: RedisServer
    env: dict[str, str]
    logdir: Path
    url: str
    front: Service
    worker: Service
    services: list[Service]
    reference: str
    job_id: str


@contextmanager
def lone_worker(tmp_path_factory: pytest.TempPathFactory, name: str, **env: str) -> Iterator[LoneWorker]:
    server = RedisServer()
    logdir = tmp_path_factory.mktemp(f"{name}-logs")
    settings = {"STREAMQ_REDIS_URL": server.url, "STREAMQ_DRAIN_SECONDS": "0", **env}
    services: list[Service] = []
    try:
        worker = start_synthetic_worker(settings, logdir, "synth", f"{name}-a", tokens_per_second=20)
        services.append(worker)
        front, url = start_front(settings, logdir, f"{name}-front")
        services.append(front)
        wait_workers(url, 1)
        with httpx.Client(timeout=30) as client:
            clean = client.post(f"{url}/v1/jobs", json={"prompt": "clean", "max_tokens": 30}).json()
            reference = text_of(follow(client, url, clean["id"]))
            job = client.post(f"{url}/v1/jobs", json={"prompt": name, "max_tokens": 30}).json()
            status = f"{url}/v1/jobs/{job['id']}"
            wait_for(lambda: client.get(status).json()["usage"]["completion_tokens"] >= 3, 30, "tokens")
        yield LoneWorker(server, settings, logdir, url, front, worker, services, reference, job["id"])
    finally:
        for service in services:
            service.stop()
        server.close()


def test_with_no_worker_alive_the_fronts_janitor_requeues_a_dead_workers_job(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The janitor runs in fronts too: a job whose only worker was SIGKILLed goes back to its queue
    with no worker alive, and the next worker to come continues it, whole."""
    with (
        lone_worker(tmp_path_factory, "orphan", STREAMQ_LEASE_SECONDS="2") as lone,
        httpx.Client(timeout=30) as client,
    ):
        status = f"{lone.url}/v1/jobs/{lone.job_id}"
        lone.worker.stop(signal.SIGKILL)
        wait_for(lambda: client.get(status).json()["status"] == "queued", 20, "the front's janitor")
        assert not lone.worker.alive() and f"job {lone.job_id} lost its worker" in lone.front.log()
        lone.services.append(
            start_synthetic_worker(lone.env, lone.logdir, "synth", "orphan-b", tokens_per_second=20)
        )
        assert follow(client, lone.url, lone.job_id)[-1].event == "done"
        assert client.get(status).json()["text"] == lone.reference


def test_a_run_whose_start_a_failover_lost_puts_the_job_back(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """Replication is in order, so a failover may keep RQ's hand-over of a job to a worker but
    lose the start that followed: the new primary has the job queued, on no list, while its
    worker runs it. That run loses the job at its next lease renewal, and puts it back on its
    queue; it runs again, whole."""
    with lone_worker(tmp_path_factory, "unstarted") as lone, httpx.Client(timeout=30) as client:
        # What the new primary would hold: the job as submitted, before its start.
        r, j = lone.redis.client(decode_responses=True), lone.job_id
        _, queued_event = decoded_entries(r.xrange(keys.events(j), count=1))[0]
        pipe = r.pipeline(transaction=True)
        pipe.hset(keys.job(j), "status", "queued")
        pipe.hdel(keys.job(j), "run", "worker", "started_at", "attempts", "completion_tokens")
        pipe.delete(keys.lease(j), keys.text(j), keys.tokens(j), keys.events(j))
        pipe.zrem(keys.RUNNING, j)
        pipe.xadd(keys.events(j), {"event": queued_event["event"], "data": queued_event["data"]})
        pipe.execute()
        events = follow(client, lone.url, j)
        assert events[-1].event == "done", events[-1]
        assert client.get(f"{lone.url}/v1/jobs/{j}").json()["text"] == lone.reference
        assert "Redis lost its start" in lone.worker.log()
