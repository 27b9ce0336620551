"""A worker killed after RQ handed it a job but before it started the job (issue 19): the job is
noticed in RQ's intermediate list and queued again by streamq's janitor within seconds, or a
cancel ends it at once; for every model's queue. Real Redis, real worker processes."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import httpx
import pytest
from rq.queue import Queue
from rq.registry import FailedJobRegistry
from rq.worker import Worker, WorkerStatus

from harness.redis_server import RedisServer
from harness.services import Service, start_synthetic_worker, wait_for
from shared import keys
from shared.settings import Settings
from shared.stranded_jobs import StrandedJobs
from tests.conftest import Stack
from tests.processes import blocked_in
from tests.redis_replies import entries
from tests.reference_answers import greedy_answer
from tests.sse import SSE, follow, text_of
from worker.synthetic import WORDS

pytestmark = pytest.mark.e2e

TOKENS = 48


def serving(stack: Stack, model: str, count: int) -> bool:
    return bool(httpx.get(f"{stack.url}/readyz").json()["models"].get(model, 0) == count)


def start_model_worker(stack: Stack, model: str, name: str) -> Service:
    args = ["worker", "--model", str(stack.model_dir), "--served-name", model, "--name", name, "--slots", "1"]
    service = Service(args, stack.env, name, stack.logdir)
    stack.services.append(service)
    return service


def synthetic_worker(stack: Stack, model: str) -> Service:
    worker = start_synthetic_worker(stack.env, stack.logdir, model, f"{model}-a")
    stack.services.append(worker)
    wait_for(lambda: serving(stack, model, 1), 60, "the synthetic worker")
    return worker


def listening(stack: Stack, model: str, name: str) -> bool:
    """``name``'s dispatcher is idle in its dequeue: its BLMOVE on the model's queue is (about to
    be) pending. A worker counts in /readyz from its first heartbeat, before it listens."""
    queue = Queue(keys.queue_name(model), connection=stack.redis.client())
    listed = [w for w in Worker.all(queue=queue) if w.name == name]
    return any(w.get_state() == WorkerStatus.IDLE for w in listed)


def strand(stack: Stack, worker: Service, model: str, body: dict[str, Any]) -> str:
    """Freeze ``worker`` (its idle dispatcher stays blocked in BLMOVE on the server), submit a job
    that Redis hands to it, then kill the worker: the job is left in the intermediate list."""
    wait_for(lambda: listening(stack, model, worker.name), 60, f"{worker.name}'s dispatcher to listen")
    r = stack.redis.client(decode_responses=True)
    wait_for(lambda: blocked_in(r, worker.proc.pid, "blmove"), 30, f"{worker.name}'s BLMOVE to block")
    worker.proc.send_signal(signal.SIGSTOP)
    response = httpx.post(f"{stack.url}/v1/jobs", json={"model": model, **body})
    assert response.status_code == 202, response.text
    job_id = str(response.json()["id"])
    parked = keys.intermediate(keys.rq_queue(model))
    wait_for(lambda: r.lpos(parked, job_id) is not None, 10, "the job to be handed to the frozen worker")
    worker.proc.send_signal(signal.SIGKILL)
    worker.proc.wait(timeout=10)
    assert httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["status"] == "queued"
    return job_id


def test_a_job_taken_by_a_worker_killed_before_starting_it_runs_on_the_next_worker(
    stack: Stack, tiny_backend: Any
) -> None:
    model = "strand-run"
    worker_a = start_model_worker(stack, model, "strand-run-a")
    wait_for(lambda: serving(stack, model, 1), 90, "worker A")
    prompt = "Tell me about queues that never lose a job."
    job_id = strand(stack, worker_a, model, {"prompt": prompt, "max_tokens": TOKENS, "temperature": 0})

    events: list[SSE] = []
    client = httpx.Client(timeout=120)
    reader = threading.Thread(target=lambda: events.extend(follow(client, stack.url2, job_id)))
    reader.start()
    worker_b = start_model_worker(stack, model, "strand-run-b")
    wait_for(lambda: stack.redis.client().zscore(keys.WORKERS, "strand-run-b") is not None, 90, "worker B")
    ready_at = time.monotonic()

    def started() -> bool:
        return bool(httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["status"] != "queued")

    wait_for(started, 20, "the stranded job to start on worker B")
    assert time.monotonic() - ready_at <= 10
    reader.join(timeout=120)
    assert [e.event for e in events][-1] == "done"
    assert text_of(events) == greedy_answer(tiny_backend, prompt, TOKENS)  # the same stream as a clean run
    view = httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()
    assert view["status"] == "finished" and view["worker"].startswith("strand-run-b")
    r = stack.redis.client()
    assert r.lpos(keys.intermediate(keys.rq_queue(model)), job_id) is None
    assert "taken by a worker that died before starting it" in stack.logs()
    worker_b.stop()  # later tests see only the models they serve


def test_a_cancel_ends_a_job_stranded_by_a_killed_worker_at_once(stack: Stack) -> None:
    model = "strand-cancel"
    job_id = strand(stack, synthetic_worker(stack, model), model, {"prompt": "hello", "max_tokens": 5})

    events: list[SSE] = []
    client = httpx.Client(timeout=60)
    reader = threading.Thread(target=lambda: events.extend(follow(client, stack.url2, job_id)))
    reader.start()
    asked = time.monotonic()
    response = httpx.post(f"{stack.url}/v1/jobs/{job_id}/cancel", timeout=30)
    assert time.monotonic() - asked < 1.0
    assert response.status_code == 200 and response.json()["status"] == "canceled"
    reader.join(timeout=10)
    assert not reader.is_alive() and events[-1].event == "canceled"  # every follower stops
    assert stack.redis.client().lpos(keys.intermediate(keys.rq_queue(model)), job_id) is None
    assert httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["status"] == "canceled"


def test_a_job_parked_in_another_models_intermediate_list_is_queued_again(stack: Stack) -> None:
    model = "strand-other"
    job_id = strand(stack, synthetic_worker(stack, model), model, {"prompt": "hello", "max_tokens": 5})
    r = stack.redis.client(decode_responses=True)
    # No worker of this model is alive: the janitor of another model's worker rescues it.
    killed_at = time.monotonic()
    wait_for(lambda: r.lpos(keys.rq_queue(model), job_id) is not None, 15, "the job back in its queue")
    assert time.monotonic() - killed_at <= 10
    assert r.lpos(keys.intermediate(keys.rq_queue(model)), job_id) is None
    second = start_synthetic_worker(stack.env, stack.logdir, model, "strand-other-b")
    stack.services.append(second)

    def finished() -> bool:
        return bool(httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["status"] == "finished")

    wait_for(finished, 60, "the job to finish on the second worker")
    words = httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["text"].split()
    assert words == [WORDS[n % len(WORDS)] for n in range(1, 6)]  # whole, once
    second.stop()


def test_a_job_rq_failed_while_streamq_had_it_live_ends_failed_for_its_followers(
    redis_server: RedisServer,
) -> None:
    r = redis_server.client()
    settings = Settings(redis_url=redis_server.url)
    queue = Queue(keys.queue_name("strand-rq"), connection=r)
    job = queue.enqueue("worker.tasks.generate", job_id="strandrq1")
    r.hset(keys.job(job.id), mapping={"status": "queued", "model": "strand-rq"})
    queue.remove(job)
    FailedJobRegistry(queue=queue).add(job, ttl=60, exc_string="Job was stuck in intermediate queue.")
    stranded = StrandedJobs(r, settings)
    assert stranded.end_failed_in_rq(stranded.queues()) == [job.id]
    assert r.hget(keys.job(job.id), "status") == b"failed"
    events = [fields[b"event"] for _, fields in entries(r.xrange(keys.events(job.id)))]
    assert events == [b"error"]
    assert r.hget(keys.job(job.id), "error_type") == b"job_lost"


def test_a_queue_lost_from_rqs_set_of_queues_is_listed_again_by_its_worker(stack: Stack) -> None:
    """The janitor finds a model's taken-but-never-started jobs through RQ's set of queues, and a
    submit adds a queue there only when its push made the list: a member lost from the set
    (removed by hand) is put back by the model's worker at its next maintenance pass."""
    model = "relisted"
    env = {**stack.env, "STREAMQ_MAINTENANCE_INTERVAL": "1"}
    worker = start_synthetic_worker(env, stack.logdir, model, f"{model}-a")
    stack.services.append(worker)
    try:
        wait_for(lambda: serving(stack, model, 1), 60, "the synthetic worker")
        r = stack.redis.client(decode_responses=True)
        queue = keys.rq_queue(model)
        wait_for(lambda: r.sismember(keys.RQ_QUEUES, queue), 10, "the worker to list its queue")
        r.srem(keys.RQ_QUEUES, queue)
        wait_for(lambda: r.sismember(keys.RQ_QUEUES, queue), 10, "the queue to be listed again")
    finally:
        worker.stop()


def test_a_worker_stalled_past_its_lease_that_takes_its_job_back_finishes_it_whole(stack: Stack) -> None:
    """A worker frozen longer than the lease (a long GC pause, a VM stall): a janitor hands its
    job back to the queue, and the same worker, awake, takes it again in its free slot while the
    frozen run is still there. The stalled run finds itself lost and ends; the new run keeps its
    own lease (the lost run's end released it, so the job was handed back, and failed after its
    attempts) and finishes the job once, its text whole: no gap, no repeat."""
    model = "stall-retake"
    worker = start_synthetic_worker(
        stack.env, stack.logdir, model, f"{model}-a", tokens_per_second=10, slots=2
    )
    stack.services.append(worker)
    wait_for(lambda: serving(stack, model, 1), 60, "the worker")
    tokens = 200  # 20 s: the new run goes on well past a lease after the stall
    job_id = httpx.post(
        f"{stack.url}/v1/jobs", json={"model": model, "prompt": "go", "max_tokens": tokens}
    ).json()["id"]
    wait_for(
        lambda: len(httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()["text"]) > 0, 20, "the first words"
    )
    worker.proc.send_signal(signal.SIGSTOP)
    time.sleep(Settings().lease_seconds + 2)  # past the lease: a front's janitor requeues the job
    worker.proc.send_signal(signal.SIGCONT)
    with httpx.Client(timeout=60) as client:
        events = follow(client, stack.url, job_id)
    assert events[-1].event == "done", events[-1]
    assert text_of(events) == "".join(WORDS[n % len(WORDS)] + " " for n in range(1, tokens + 1))
    view = httpx.get(f"{stack.url}/v1/jobs/{job_id}").json()
    assert view["status"] == "finished" and view["usage"]["completion_tokens"] == tokens
    worker.stop()
