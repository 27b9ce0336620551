"""A cancel that comes as the job writes its end: the job finished before its worker saw the
cancel. The cancel answered 200 with the finished job (a fuzzer's find, about 1 in 80 tries),
as if it had canceled it; it is a 409 ``job_already_ended`` with the job, as for a job that had
ended before the cancel came. Made certain here: the worker is frozen (SIGSTOP) while the
cancel waits, and its end is written as its worker would write it. A cancel that comes as its
job's worker dies waits for the lease to lapse and the job to end canceled (it answered
"running", a tenth of a second before the job ended)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from harness.redis_server import RedisServer
from harness.services import Service, start_front, start_synthetic_worker, wait_for, wait_workers
from shared import keys
from shared.job_store.vocabulary import JobField
from tests.job_scripts import _done, _finish

pytestmark = pytest.mark.e2e

MODEL = "race-synth"


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[tuple[str, Service, redis.Redis]]:
    server = RedisServer()
    env = {"STREAMQ_REDIS_URL": server.url, "STREAMQ_METRICS_PORT": "0", "STREAMQ_CANCEL_WAIT": "3"}
    started: list[Service] = []
    try:
        worker = start_synthetic_worker(env, tmp_path, MODEL, "race-worker", tokens_per_second=5)
        started.append(worker)
        front, url = start_front(env, tmp_path, "race-front")
        started.append(front)
        wait_workers(url, 1)
        yield url, worker, redis.Redis.from_url(server.url, decode_responses=True)
    finally:
        for service in started:
            service.proc.send_signal(signal.SIGCONT)
            service.stop()
        server.close()


def _running_job(http: httpx.Client, url: str, r: redis.Redis) -> dict[str, Any]:
    """A job submitted, once its worker runs it."""
    job: dict[str, Any] = http.post(
        f"{url}/v1/jobs", json={"model": MODEL, "prompt": "hi", "max_tokens": 100}
    ).json()
    wait_for(lambda: r.hget(keys.job(job["id"]), JobField.STATUS) == "running", 20, "the job running")
    return job


def test_a_cancel_the_jobs_end_overtook_is_a_409_with_the_finished_job(
    deployment: tuple[str, Service, redis.Redis],
) -> None:
    url, worker, r = deployment
    with httpx.Client(timeout=30) as http:
        job = _running_job(http, url, r)
        worker.proc.send_signal(signal.SIGSTOP)  # it will not see the cancel
        answer: dict[str, Any] = {}

        def cancel() -> None:
            answer["response"] = http.post(f"{url}/v1/jobs/{job['id']}/cancel")

        asking = threading.Thread(target=cancel)
        asking.start()
        wait_for(lambda: r.hget(keys.job(job["id"]), "cancel") == "1", 10, "the cancel flag")
        time.sleep(0.2)
        run = r.hget(keys.job(job["id"]), JobField.RUN)
        assert _finish(r, job["id"], _done(), str(run)) == "ok"  # its end, as its worker writes it
        asking.join(30)
        worker.proc.send_signal(signal.SIGCONT)
    response = answer["response"]
    assert response.status_code == 409, response.text
    body = response.json()
    assert body["error"]["code"] == "job_already_ended" and body["job"]["status"] == "finished", body


def test_a_cancel_as_the_worker_dies_answers_the_canceled_job(
    deployment: tuple[str, Service, redis.Redis],
) -> None:
    url, worker, r = deployment
    with httpx.Client(timeout=30) as http:
        job = _running_job(http, url, r)
        worker.proc.kill()
        worker.proc.wait(10)
        canceled = http.post(f"{url}/v1/jobs/{job['id']}/cancel")
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["status"] == "canceled", canceled.json()  # not "running"
