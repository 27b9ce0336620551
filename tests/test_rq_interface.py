"""The RQ that streamq's adapter (worker/rq_worker.py) and dispatcher (worker/rq_runs.py) rely
on, checked against the installed RQ, which pyproject bounds.

The adapter subclasses RQ for the plain ``rq worker -w`` way, and the dispatcher of ``streamq
worker`` writes RQ's records with RQ's own primitives. These tests check that the installed RQ
still has every hook, private attribute and parameter they rely on, and that the lists streamq's
scripts write to are RQ's: an RQ release that moved any of it fails here (tests/test_rq_adapter.py
runs both on a real Redis).
"""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path
from typing import Any

import pytest
import rq
from packaging.requirements import Requirement
from rq import worker_registration
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import CanceledJobRegistry, StartedJobRegistry
from rq.timeouts import BaseDeathPenalty
from rq.worker import SimpleWorker

from harness.redis_server import RedisServer
from shared import keys
from shared.settings import Settings
from tests.rq_doubles import Scripted, unique
from worker.rq_worker import EngineDeadline, StreamqJob, StreamqWorker

ROOT = Path(__file__).resolve().parents[1]

# The RQ methods each adapter class overrides (the class it extends must still have them, with
# the parameters RQ calls them with), and the methods it adds of its own.
OVERRIDES: dict[type, tuple[type, set[str], set[str]]] = {
    EngineDeadline: (BaseDeathPenalty, {"setup_death_penalty", "cancel_death_penalty"}, set()),
    StreamqJob: (Job, {"_execute"}, set()),
    StreamqWorker: (
        SimpleWorker,
        {
            "__init__",
            "bootstrap",
            "teardown",
            "subscribe",
            "execute_job",
            "work",  # exits 1 after its loop when its engine broke
            "clean_registries",
            "handle_job_success",
        },
        {"reannounce", "_reannounce_soon"},  # enters RQ's lists again after Redis came back empty
    ),
}

# RQ methods the adapter calls, with the keyword arguments it passes them.
CALLED: list[tuple[Any, set[str]]] = [
    (SimpleWorker.register_birth, set()),
    (SimpleWorker.register_death, set()),
    (SimpleWorker.heartbeat, set()),
    (SimpleWorker.set_state, {"state"}),
    (SimpleWorker.get_state, set()),
    (SimpleWorker.serialize, set()),
    (worker_registration.register, {"worker", "pipeline"}),
    (SimpleWorker.increment_successful_job_count, {"pipeline"}),
    (SimpleWorker.increment_failed_job_count, {"pipeline"}),
    (SimpleWorker.increment_total_working_time, {"pipeline"}),
    (Execution.create, {"job", "ttl", "pipeline", "worker_name"}),
    (Execution.delete, {"job", "pipeline"}),
    (Execution.heartbeat, {"started_job_registry", "ttl", "pipeline"}),
    (Job.refresh, set()),
    (Job.get_result_ttl, {"default_ttl"}),
    (Job.prepare_for_execution, {"worker_name", "pipeline"}),
    (
        Job._handle_success,
        {"pipeline", "worker_name", "execution_id", "execution_started_at", "execution_ended_at"},
    ),
    (
        Job._handle_failure,
        {"pipeline", "worker_name", "execution_id", "execution_started_at", "execution_ended_at"},
    ),
    (Job.set_status, {"pipeline"}),
    (Job.cleanup, {"ttl", "pipeline", "remove_from_queue"}),
    (Queue.enqueue_job, {"at_front"}),
    (CanceledJobRegistry.__init__, {"job_class", "serializer"}),
    (CanceledJobRegistry.add, {"ttl", "pipeline"}),
    (StartedJobRegistry.remove_executions, set()),  # the janitor's requeue
]


def test_the_installed_rq_is_one_the_project_allows() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (wanted,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "rq"]
    assert wanted.specifier.contains(rq.__version__), (
        f"RQ {rq.__version__} is installed, but pyproject allows {wanted}: the adapter is checked "
        "against the installed RQ only"
    )


@pytest.mark.parametrize("adapter", list(OVERRIDES), ids=lambda c: c.__name__)
def test_every_rq_method_the_adapter_overrides_is_still_rqs(adapter: type) -> None:
    base, hooks, own = OVERRIDES[adapter]
    defined = {
        name
        for name, value in vars(adapter).items()
        if inspect.isfunction(value) and (name == "__init__" or not name.startswith("__"))
    }
    assert defined == hooks | own, "list the adapter's new or removed overrides in OVERRIDES"
    for name in hooks:
        theirs = getattr(base, name, None)
        assert theirs is not None, f"RQ {rq.__version__}: {base.__name__}.{name} is gone"
        ours = inspect.signature(getattr(adapter, name)).parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ours.values())
        missing = [p for p in inspect.signature(theirs).parameters if p not in ours and not takes_any]
        missing = [p for p in missing if p not in ("args", "kwargs")]
        assert not missing, f"RQ {rq.__version__}: {base.__name__}.{name} now takes {missing}"


@pytest.mark.parametrize(("method", "keywords"), CALLED, ids=lambda v: getattr(v, "__qualname__", ""))
def test_the_rq_methods_the_adapter_calls_take_its_arguments(method: Any, keywords: set[str]) -> None:
    parameters = inspect.signature(method).parameters
    assert keywords <= set(parameters), f"RQ {rq.__version__}: {method.__qualname__} lost {keywords}"


def test_rq_workers_have_the_private_attributes_the_adapter_uses(redis_server: RedisServer) -> None:
    runtime = Scripted(redis_server, unique("rq"), {})
    worker = StreamqWorker(connection=redis_server.client(), settings=Settings(), runtime=runtime)
    assert isinstance(SimpleWorker.death_penalty_class, type)  # EngineDeadline takes its place
    assert worker.job_class is StreamqJob  # RQ builds the jobs it dequeues with it
    assert isinstance(worker.executions, dict)  # RQ's runs of the worker, by execution id
    assert worker._stop_requested is False  # its loop ends after the job when set (a broken engine)
    # The worker-channel subscription it redoes (StreamqWorker.subscribe), as RQ's own does it.
    assert isinstance(worker.pubsub_channel_name, str) and callable(worker.handle_payload)
    assert callable(worker._pubsub_exception_handler)
    assert "sleep_time" in inspect.signature(redis_server.client().pubsub().run_in_thread).parameters
    probe = vars(Job("probe", connection=redis_server.client()))
    assert {"_result", "ended_at"} <= set(probe)  # the dispatcher sets them before RQ files a success


def test_the_rq_lists_streamqs_scripts_write_to_are_rqs(redis_server: RedisServer) -> None:
    queue = Queue(keys.queue_name("some-model"), connection=redis_server.client())
    assert queue.key == keys.rq_queue("some-model")  # the handback and cancel scripts push/remove here
    assert queue.intermediate_queue_key == keys.intermediate(queue.key)  # taken, not yet started
    assert Queue.redis_queues_keys == keys.RQ_QUEUES  # where the janitor finds every queue
